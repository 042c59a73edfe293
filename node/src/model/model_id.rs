//! A model's identity from its GGUF file: the file's [`Manifest`] (its metadata and
//! tensor table, and the hashes of every tensor's bytes in chunks), whose hash is the
//! model id, so nodes holding the same weights agree on it without any registry,
//! however their files lay the weights out. Hashing a multi-gigabyte file takes
//! seconds, so the id is remembered next to the file, keyed by its size and
//! modification time.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use allmende_protocol::manifest::{chunk_hash, MetaValue, TensorEntry, CHUNK_BYTES};
use allmende_protocol::{Manifest, ModelId};
use candle_core::quantized::gguf_file::Value;
use indicatif::ProgressBar;

use super::gguf::GgufFile;
use super::ModelError;

/// The cache of a file's id, beside it.
fn sidecar(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".allmende-model-id");
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
    let id = manifest(&GgufFile::open(path)?, progress)?.id();
    if let Some(stamp) = stamp {
        // Best effort: a read-only model directory just means hashing again next time.
        let _ = std::fs::write(sidecar(path), format!("{stamp} {}\n", id.to_hex()));
    }
    Ok(id)
}

/// The manifest of an open file: every tensor's bytes read and hashed chunk by chunk;
/// `progress` counts bytes hashed.
pub fn manifest(gguf: &GgufFile, progress: &ProgressBar) -> Result<Manifest, ModelError> {
    let path = gguf.path();
    let io_err = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let names: Vec<&str> = gguf.tensor_names().collect();
    progress.set_length(names.iter().map(|n| gguf.tensor_bytes(n)).sum());
    let mut chunk = vec![0u8; CHUNK_BYTES as usize];
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let (Some(info), Some(start)) = (gguf.tensor_info(name), gguf.tensor_start(name)) else {
            return Err(ModelError::MissingTensor(name.to_string()));
        };
        let bytes = gguf.tensor_bytes(name);
        file.seek(SeekFrom::Start(start)).map_err(io_err)?;
        let mut chunks = Vec::with_capacity(TensorEntry::chunk_count(bytes));
        let mut left = bytes;
        while left > 0 {
            let part = &mut chunk[..left.min(CHUNK_BYTES) as usize];
            file.read_exact(part).map_err(io_err)?;
            chunks.push(chunk_hash(part));
            left -= part.len() as u64;
            progress.inc(part.len() as u64);
        }
        tensors.push(TensorEntry {
            name: name.to_string(),
            ggml_type: info.dtype.code(),
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            bytes,
            chunks,
        });
    }
    let metadata = gguf
        .metadata_keys()
        .filter_map(|key| Some((key.to_string(), meta_value(gguf.metadata(key)?))));
    Ok(Manifest::new(metadata, tensors))
}

fn meta_value(value: &Value) -> MetaValue {
    match value {
        Value::U8(v) => MetaValue::U8(*v),
        Value::I8(v) => MetaValue::I8(*v),
        Value::U16(v) => MetaValue::U16(*v),
        Value::I16(v) => MetaValue::I16(*v),
        Value::U32(v) => MetaValue::U32(*v),
        Value::I32(v) => MetaValue::I32(*v),
        Value::U64(v) => MetaValue::U64(*v),
        Value::I64(v) => MetaValue::I64(*v),
        Value::F32(v) => MetaValue::F32(*v),
        Value::F64(v) => MetaValue::F64(*v),
        Value::Bool(v) => MetaValue::Bool(*v),
        Value::String(v) => MetaValue::String(v.clone()),
        Value::Array(items) => MetaValue::Array(items.iter().map(meta_value).collect()),
    }
}
