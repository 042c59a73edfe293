//! Where Allmende keeps its files: the model cache and the data directory.

use std::path::PathBuf;

/// File name of the default model, as `scripts/fetch-model.sh` extracts it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$ALLMENDE_CACHE_DIR`, else `$XDG_CACHE_HOME/allmende`, else `~/.cache/allmende`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALLMENDE_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("allmende");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("allmende")
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
    if let Some(dir) = std::env::var_os("ALLMENDE_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("allmende");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local").join("share").join("allmende")
}

/// `$ALLMENDE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/allmende`, else `~/.config/allmende`:
/// where a node finds its bootstrap list (`bootstrap.txt`).
pub fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALLMENDE_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("allmende");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".config").join("allmende")
}
