//! Where Allmende keeps its files: the model cache and the data directory.

use std::path::PathBuf;

/// File name of the default model, as `scripts/fetch-model.sh` extracts it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$ALLMENDE_CACHE_DIR`, else `$XDG_CACHE_HOME/allmende`, else `~/.cache/allmende`.
pub fn cache_dir() -> PathBuf {
    dir("ALLMENDE_CACHE_DIR", "XDG_CACHE_HOME", &[".cache"])
}

/// The model used when `--model` is not given: `$ALLMENDE_MODEL`, else the default
/// model in the cache directory.
pub fn default_model() -> PathBuf {
    match std::env::var_os("ALLMENDE_MODEL").filter(|m| !m.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => cache_dir().join(DEFAULT_MODEL_FILE),
    }
}

/// `$ALLMENDE_DATA_DIR`, else `$XDG_DATA_HOME/allmende`, else `~/.local/share/allmende`:
/// where a node keeps its identity key.
pub fn data_dir() -> PathBuf {
    dir("ALLMENDE_DATA_DIR", "XDG_DATA_HOME", &[".local", "share"])
}

/// `$ALLMENDE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/allmende`, else `~/.config/allmende`:
/// where a node finds its bootstrap list (`bootstrap.txt`).
pub fn config_dir() -> PathBuf {
    dir("ALLMENDE_CONFIG_DIR", "XDG_CONFIG_HOME", &[".config"])
}

/// `$own`, else `$xdg/allmende`, else `~/<under>/allmende` (the XDG base directories).
fn dir(own: &str, xdg: &str, under: &[&str]) -> PathBuf {
    let set = |name| std::env::var_os(name).filter(|d: &std::ffi::OsString| !d.is_empty());
    if let Some(dir) = set(own) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = set(xdg) {
        return PathBuf::from(dir).join("allmende");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    under
        .iter()
        .fold(home, |path, part| path.join(part))
        .join("allmende")
}
