//! A model's manifest: its metadata and tensor table and, per tensor, the hashes of
//! its bytes in chunks of [`CHUNK_BYTES`], so that any part of the weights can be
//! checked as it arrives and a bad chunk blamed on the peer that sent it.
//!
//! The [`ModelId`] is the hash of the manifest's canonical encoding. Nothing about how
//! a file lays the model out is in it (tensor offsets, `general.alignment`, the
//! `split.*` keys of a model split into several files, the order of keys and
//! tensors), so a split and a merged copy of the same weights are one model.

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::model::ModelId;

/// Bytes of a tensor per hashed chunk (the last chunk may be shorter).
pub const CHUNK_BYTES: u64 = 1 << 20;

/// BLAKE3 of one chunk.
pub type ChunkHash = [u8; 32];

/// A metadata value, as GGUF types it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

/// One tensor: its name, ggml type code, shape (as candle orders it: outermost
/// first), size in bytes and the hash of each of its chunks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub ggml_type: u32,
    pub shape: Vec<u64>,
    pub bytes: u64,
    pub chunks: Vec<ChunkHash>,
}

impl TensorEntry {
    /// The byte range of chunk `index` within the tensor.
    pub fn chunk_range(&self, index: usize) -> std::ops::Range<u64> {
        let start = index as u64 * CHUNK_BYTES;
        start.min(self.bytes)..(start + CHUNK_BYTES).min(self.bytes)
    }

    /// The chunks a tensor of `bytes` bytes has.
    pub fn chunk_count(bytes: u64) -> usize {
        bytes.div_ceil(CHUNK_BYTES) as usize
    }

    /// Whether `data` is chunk `index` of this tensor.
    pub fn verify_chunk(&self, index: usize, data: &[u8]) -> bool {
        let range = self.chunk_range(index);
        self.chunks.get(index).is_some_and(|expected| {
            data.len() as u64 == range.end - range.start && chunk_hash(data) == *expected
        })
    }
}

/// A model's metadata and tensor table, in canonical form (see [`Manifest::new`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorEntry>,
}

impl Manifest {
    /// The canonical manifest of these keys and tensors: layout keys dropped, keys and
    /// tensors sorted by name.
    pub fn new(
        metadata: impl IntoIterator<Item = (String, MetaValue)>,
        tensors: impl IntoIterator<Item = TensorEntry>,
    ) -> Self {
        let mut metadata: Vec<_> = metadata
            .into_iter()
            .filter(|(key, _)| !is_layout_key(key))
            .collect();
        metadata.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tensors: Vec<_> = tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Self { metadata, tensors }
    }

    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// The model's identity: BLAKE3 of the canonical encoding.
    pub fn id(&self) -> ModelId {
        let bytes = codec::encode(self).expect("a manifest is far below the message limit");
        ModelId(*blake3::hash(&bytes).as_bytes())
    }

    /// A manifest as a peer or a cache file sends it, with the message size limit;
    /// one that is not canonical is refused (its id would not be the one asked for).
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let manifest: Manifest = codec::decode(bytes)?;
        let canonical = Manifest::new(manifest.metadata.clone(), manifest.tensors.clone());
        if canonical != manifest {
            return Err(CodecError::NotCanonical);
        }
        Ok(manifest)
    }

    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self).expect("a manifest is far below the message limit")
    }
}

/// Keys that describe how a file lays the model out, not the model.
pub fn is_layout_key(key: &str) -> bool {
    key == "general.alignment" || key.starts_with("split.")
}

/// The hash of one chunk of a tensor's bytes.
pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    *blake3::hash(data).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, data: &[u8]) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            ggml_type: 0,
            shape: vec![data.len() as u64 / 4],
            bytes: data.len() as u64,
            chunks: data.chunks(CHUNK_BYTES as usize).map(chunk_hash).collect(),
        }
    }

    fn keys(alignment: u32) -> Vec<(String, MetaValue)> {
        vec![
            (
                "general.architecture".into(),
                MetaValue::String("llama".into()),
            ),
            ("general.alignment".into(), MetaValue::U32(alignment)),
            ("llama.block_count".into(), MetaValue::U32(2)),
        ]
    }

    #[test]
    fn layout_and_order_do_not_change_the_id_and_content_does() {
        let a = vec![1u8; 3 << 20];
        let b = vec![2u8; 16];
        let one = Manifest::new(keys(32), [tensor("a", &a), tensor("b", &b)]);
        let mut split = keys(64);
        split.reverse();
        split.push(("split.count".into(), MetaValue::U16(2)));
        let other = Manifest::new(split, [tensor("b", &b), tensor("a", &a)]);
        assert_eq!(one.id(), other.id());

        let mut changed = a.clone();
        changed[(2 << 20) + 5] ^= 1;
        let third = Manifest::new(keys(32), [tensor("a", &changed), tensor("b", &b)]);
        assert_ne!(one.id(), third.id());
        // The changed byte is blamed on its chunk alone.
        let entry = one.tensor("a").unwrap();
        assert_eq!(entry.chunks.len(), 3);
        assert!(entry.verify_chunk(1, &changed[1 << 20..2 << 20]));
        assert!(!entry.verify_chunk(2, &changed[2 << 20..]));
        assert!(!entry.verify_chunk(2, &changed[2 << 20..(3 << 20) - 1]));
        assert!(!entry.verify_chunk(3, &[]));
    }

    #[test]
    fn a_manifest_round_trips_and_a_non_canonical_one_is_refused() {
        let manifest = Manifest::new(keys(32), [tensor("a", &[0; 8]), tensor("b", &[1; 8])]);
        assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
        let unsorted = Manifest {
            metadata: manifest.metadata.clone(),
            tensors: manifest.tensors.iter().rev().cloned().collect(),
        };
        assert!(matches!(
            Manifest::decode(&unsorted.encode()),
            Err(CodecError::NotCanonical)
        ));
    }
}
