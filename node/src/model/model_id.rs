//! A model's identity: the SHA-256 of its file, so nodes holding the same GGUF agree
//! on it without any registry. Hashing a multi-gigabyte file takes seconds, so the
//! digest is remembered next to the file, keyed by its size and modification time.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use allmende_protocol::ModelId;
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use super::ModelError;

fn sidecar(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".allmende-id");
    path.with_file_name(name)
}

fn stamp(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!("{} {}", meta.len(), mtime.as_nanos()))
}

/// The model id of the file at `path`; `progress` counts bytes hashed.
pub fn model_id(path: &Path, progress: &ProgressBar) -> Result<ModelId, ModelError> {
    let io_err = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stamp = stamp(path);
    if let (Some(stamp), Ok(saved)) = (&stamp, std::fs::read_to_string(sidecar(path))) {
        if let Some((saved_stamp, hex)) = saved.trim().rsplit_once(' ') {
            if saved_stamp == stamp {
                if let Some(id) = ModelId::from_hex(hex) {
                    return Ok(id);
                }
            }
        }
    }
    let mut file = File::open(path).map_err(io_err)?;
    progress.set_length(file.metadata().map_err(io_err)?.len());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.inc(n as u64);
    }
    let id = ModelId(hasher.finalize().into());
    if let Some(stamp) = stamp {
        // Best effort: a read-only model directory just means hashing again next time.
        let _ = std::fs::write(sidecar(path), format!("{stamp} {}\n", id.to_hex()));
    }
    Ok(id)
}
