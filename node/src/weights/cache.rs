//! A donor's copy of the weights it fetched, in `<weights dir>/<model id>/`:
//! - `manifest`: the model's manifest, whose hash is the directory's name;
//! - `tensors`: every tensor's bytes at the place the manifest's order gives it, as a
//!   sparse file, so the tensors this node never fetched take no disk;
//! - `held`: a log of the chunks written, one `tensor<TAB>chunk` line each.
//!
//! When the cache is opened again each logged chunk is checked against its hash, so
//! a fetch cut short by a crash resumes where it stopped and a torn write is fetched
//! again. The loader reads the tensors through [`Cache::gguf`] like any model file.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use allmende_protocol::manifest::{MetaValue, TensorEntry};
use allmende_protocol::{Manifest, ModelId};
use candle_core::quantized::gguf_file::Value;

use crate::model::gguf_header::{Content, TensorInfo};
use crate::model::tensor_type::TensorType;
use crate::model::{GgufFile, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("weights cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the manifest of model {model} lists {problem}; it cannot be a model this version reads"
    )]
    BadManifest { model: String, problem: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A model's tensors as far as this node holds them.
pub struct Cache {
    dir: PathBuf,
    manifest: Manifest,
    /// Where each tensor (by its index in the manifest) starts in `tensors`.
    starts: Vec<u64>,
    data: File,
    held: Mutex<HashSet<(usize, u32)>>,
    log: Mutex<File>,
}

impl Cache {
    /// The directory of `model`'s cache under `root`.
    pub fn dir(root: &Path, model: &ModelId) -> PathBuf {
        root.join(model.to_hex())
    }

    /// The manifest stored in `model`'s cache, if one is there and hashes to `model`.
    pub fn stored_manifest(root: &Path, model: &ModelId) -> Option<Manifest> {
        let bytes = std::fs::read(Self::dir(root, model).join("manifest")).ok()?;
        Manifest::decode(&bytes).ok().filter(|m| m.id() == *model)
    }

    /// Opens (or creates) the cache of `manifest`'s model under `root`, keeping of its
    /// logged chunks only those whose bytes still match their hashes.
    pub fn open(root: &Path, manifest: Manifest) -> Result<Self, CacheError> {
        let model = manifest.id();
        let starts = layout(&manifest)?;
        let dir = Self::dir(root, &model);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let manifest_path = dir.join("manifest");
        std::fs::write(&manifest_path, manifest.encode()).map_err(io(&manifest_path))?;

        let data_path = dir.join("tensors");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io(&data_path))?;
        let total = manifest.tensors().iter().map(|t| t.bytes).sum::<u64>();
        // Grows the file without writing: the tensors not fetched stay holes.
        if data.metadata().map_err(io(&data_path))?.len() != total {
            data.set_len(total).map_err(io(&data_path))?;
        }

        let log_path = dir.join("held");
        let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
        let mut cache = Self {
            dir,
            manifest,
            starts,
            data,
            held: Mutex::new(HashSet::new()),
            log: Mutex::new(File::create(&log_path).map_err(io(&log_path))?),
        };
        let mut buf = Vec::new();
        let mut held = HashSet::new();
        for line in logged.lines() {
            let Some((name, index)) = line.split_once('\t') else {
                continue;
            };
            let (Some(tensor), Ok(index)) = (cache.index_of(name), index.parse::<u32>()) else {
                continue;
            };
            if cache.read_into(tensor, index, &mut buf).is_ok()
                && cache.manifest.tensors()[tensor].verify_chunk(index as usize, &buf)
            {
                held.insert((tensor, index));
            }
        }
        // The log rewritten with the chunks that checked out.
        for &(tensor, index) in &held {
            cache.log_chunk(tensor, index)?;
        }
        *cache.held.get_mut().unwrap_or_else(|e| e.into_inner()) = held;
        Ok(cache)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir_path(&self) -> &Path {
        &self.dir
    }

    /// The data file's path.
    pub fn data_path(&self) -> PathBuf {
        self.dir.join("tensors")
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.manifest
            .tensors()
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
    }

    pub fn holds(&self, tensor: &str, index: u32) -> bool {
        self.index_of(tensor).is_some_and(|t| {
            self.held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&(t, index))
        })
    }

    /// Whether every chunk of `tensor` is here.
    pub fn holds_tensor(&self, entry: &TensorEntry) -> bool {
        (0..entry.chunks.len() as u32).all(|i| self.holds(&entry.name, i))
    }

    /// Chunk `index` of `tensor`, if this node holds it.
    pub fn chunk(&self, tensor: &str, index: u32) -> Option<Vec<u8>> {
        let t = self.index_of(tensor)?;
        if !self.holds(tensor, index) {
            return None;
        }
        let mut buf = Vec::new();
        self.read_into(t, index, &mut buf).ok()?;
        Some(buf)
    }

    fn read_into(&self, tensor: usize, index: u32, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let entry = &self.manifest.tensors()[tensor];
        let range = entry.chunk_range(index as usize);
        buf.resize((range.end - range.start) as usize, 0);
        self.data
            .read_exact_at(buf, self.starts[tensor] + range.start)
    }

    /// Stores chunk `index` of `tensor`, which the caller has checked against the
    /// manifest.
    pub fn put(&self, tensor: &str, index: u32, bytes: &[u8]) -> Result<(), CacheError> {
        let t = self
            .index_of(tensor)
            .ok_or_else(|| CacheError::BadManifest {
                model: self.manifest.id().short(),
                problem: format!("no tensor {tensor}"),
            })?;
        let start = self.starts[t] + self.manifest.tensors()[t].chunk_range(index as usize).start;
        let path = self.data_path();
        self.data
            .write_all_at(bytes, start)
            .map_err(|source| CacheError::Io { path, source })?;
        self.log_chunk(t, index)?;
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((t, index));
        Ok(())
    }

    fn log_chunk(&self, tensor: usize, index: u32) -> Result<(), CacheError> {
        let name = &self.manifest.tensors()[tensor].name;
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(log, "{name}\t{index}").map_err(|source| CacheError::Io {
            path: self.dir.join("held"),
            source,
        })
    }

    /// Flushes what was written to disk.
    pub fn sync(&self) -> Result<(), CacheError> {
        let path = self.data_path();
        self.data
            .sync_data()
            .map_err(|source| CacheError::Io { path, source })
    }

    /// The cached tensors as a model file the loader reads (tensors not held read as
    /// zeros: load only those held).
    pub fn gguf(&self) -> Result<GgufFile, CacheError> {
        let metadata = self
            .manifest
            .metadata()
            .iter()
            .map(|(key, value)| (key.clone(), value_of(value)))
            .collect();
        let tensor_infos = self
            .manifest
            .tensors()
            .iter()
            .zip(&self.starts)
            .map(|(t, &offset)| {
                let info = TensorInfo {
                    dtype: TensorType::from_code(t.ggml_type).expect("checked at open"),
                    shape: t.shape.iter().map(|&d| d as usize).collect(),
                    offset,
                };
                (t.name.clone(), info)
            })
            .collect();
        let content = Content {
            metadata,
            tensor_infos,
            tensor_data_offset: 0,
        };
        Ok(GgufFile::from_content(&self.data_path(), content)?)
    }
}

/// Where each tensor starts in the data file, once the manifest's tensor table is
/// known to describe tensors this version reads: known types, sizes that match their
/// shapes, a hash per chunk.
pub fn layout(manifest: &Manifest) -> Result<Vec<u64>, CacheError> {
    let bad = |problem: String| CacheError::BadManifest {
        model: manifest.id().short(),
        problem,
    };
    let mut starts = Vec::with_capacity(manifest.tensors().len());
    let mut at = 0u64;
    for t in manifest.tensors() {
        let dtype = TensorType::from_code(t.ggml_type)
            .ok_or_else(|| bad(format!("tensor {} of unknown type {}", t.name, t.ggml_type)))?;
        let elements = t
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|n| n % dtype.block_size() as u64 == 0);
        let size = elements
            .and_then(|n| (n / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64));
        if size != Some(t.bytes) || t.chunks.len() != TensorEntry::chunk_count(t.bytes) {
            return Err(bad(format!(
                "tensor {} with {} bytes and {} chunk hashes for shape {:?}",
                t.name,
                t.bytes,
                t.chunks.len(),
                t.shape
            )));
        }
        starts.push(at);
        at = at
            .checked_add(t.bytes)
            .ok_or_else(|| bad("tensors larger than any disk".into()))?;
    }
    Ok(starts)
}

/// A manifest's metadata value as the GGUF reader holds it.
fn value_of(value: &MetaValue) -> Value {
    match value {
        MetaValue::U8(v) => Value::U8(*v),
        MetaValue::I8(v) => Value::I8(*v),
        MetaValue::U16(v) => Value::U16(*v),
        MetaValue::I16(v) => Value::I16(*v),
        MetaValue::U32(v) => Value::U32(*v),
        MetaValue::I32(v) => Value::I32(*v),
        MetaValue::U64(v) => Value::U64(*v),
        MetaValue::I64(v) => Value::I64(*v),
        MetaValue::F32(v) => Value::F32(*v),
        MetaValue::F64(v) => Value::F64(*v),
        MetaValue::Bool(v) => Value::Bool(*v),
        MetaValue::String(v) => Value::String(v.clone()),
        MetaValue::Array(items) => Value::Array(items.iter().map(value_of).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allmende_protocol::manifest::{chunk_hash, CHUNK_BYTES};

    /// An f32 tensor of `values` values filled with `fill`, and its bytes.
    fn tensor(name: &str, values: u64, fill: u8) -> (TensorEntry, Vec<u8>) {
        let data = vec![fill; values as usize * 4];
        let entry = TensorEntry {
            name: name.into(),
            ggml_type: TensorType::F32.code(),
            shape: vec![values],
            bytes: data.len() as u64,
            chunks: data.chunks(CHUNK_BYTES as usize).map(chunk_hash).collect(),
        };
        (entry, data)
    }

    fn manifest(tensors: &[(TensorEntry, Vec<u8>)]) -> Manifest {
        let meta = [(
            "general.architecture".to_string(),
            MetaValue::String("llama".into()),
        )];
        Manifest::new(meta, tensors.iter().map(|(t, _)| t.clone()))
    }

    #[test]
    fn chunks_survive_a_restart_and_a_torn_one_is_dropped() {
        let root = tempfile::tempdir().unwrap();
        // Two chunks and a bit, and a small tensor after it.
        let big = tensor("blk.0.ffn_up.weight", (CHUNK_BYTES / 2) + 3, 7);
        let small = tensor("blk.1.ffn_up.weight", 8, 9);
        let manifest = manifest(&[big.clone(), small.clone()]);
        let model = manifest.id();
        let chunk = |(entry, data): &(TensorEntry, Vec<u8>), i: usize| {
            let r = entry.chunk_range(i);
            data[r.start as usize..r.end as usize].to_vec()
        };
        {
            let cache = Cache::open(root.path(), manifest.clone()).unwrap();
            assert!(!cache.holds(&big.0.name, 0));
            for i in 0..3 {
                cache.put(&big.0.name, i, &chunk(&big, i as usize)).unwrap();
            }
            cache.put(&small.0.name, 0, &small.1).unwrap();
            assert!(cache.holds_tensor(&big.0));
            assert_eq!(cache.chunk(&big.0.name, 2).unwrap(), chunk(&big, 2));
            cache.sync().unwrap();
        }
        assert_eq!(
            Cache::stored_manifest(root.path(), &model),
            Some(manifest.clone())
        );

        // A chunk whose bytes changed on disk (a write torn by a crash) is not held
        // after a restart; the others are.
        let data = Cache::dir(root.path(), &model).join("tensors");
        let file = OpenOptions::new().write(true).open(&data).unwrap();
        file.write_all_at(&[0], CHUNK_BYTES + 5).unwrap();
        let cache = Cache::open(root.path(), manifest).unwrap();
        assert!(cache.holds(&big.0.name, 0) && cache.holds(&big.0.name, 2));
        assert!(!cache.holds(&big.0.name, 1));
        assert!(cache.chunk(&big.0.name, 1).is_none());

        // The loader reads a held tensor through the cache as from a model file.
        let mut gguf = cache.gguf().unwrap();
        assert_eq!(gguf.tensor(&small.0.name).unwrap().bytes, small.1);
    }

    #[test]
    fn a_manifest_whose_sizes_do_not_match_its_shapes_is_refused() {
        let (mut entry, data) = tensor("blk.0.ffn_up.weight", 8, 1);
        entry.bytes += 4;
        let err = layout(&manifest(&[(entry, data)])).unwrap_err().to_string();
        assert!(
            err.contains("36 bytes and 1 chunk hashes for shape [8]"),
            "{err}"
        );
        let (mut entry, data) = tensor("blk.0.ffn_up.weight", 8, 1);
        entry.ggml_type = 9999;
        assert!(layout(&manifest(&[(entry, data)])).is_err());
    }
}
