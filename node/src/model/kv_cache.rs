//! Per-session key/value caches for the layers of one shard.
//!
//! Storage is plain memory, `[batch, kv_heads, capacity, head_dim]` values per layer
//! for keys and for values, in f16 as llama.cpp keeps them: half the bytes of f32 for
//! attention to read and for a session to hold, and logits closer to llama.cpp's
//! (`tests/golden.rs`). A row is rounded once, when it is written (to nearest, ties
//! to even); attention widens it back to f32 exactly. The cache grows in chunks of
//! [`CHUNK_POSITIONS`] and is written in place, so a decode step neither re-allocates
//! nor copies the history, and a session that only ever uses 100 positions never pays
//! for the model's full context. New rows are written straight from a layer's Q/K/V
//! product ([`ShardCache::append_with`]) and attention reads them where they lie
//! ([`KvView`]): no tensor operation per session and layer.

use allmende_protocol::LayerRange;
use candle_core::{bail, Result};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// Positions added each time a cache grows.
pub const CHUNK_POSITIONS: usize = 256;

/// Bytes a session's cache holds per position and layer: a key row and a value row
/// of `kv_size` (KV heads × head size) f16 values each.
pub fn bytes_per_position_and_layer(kv_size: usize) -> u64 {
    (2 * kv_size * std::mem::size_of::<f16>()) as u64
}

/// Keys and values of one layer, `[batch, kv_heads, capacity, head_dim]` each, as
/// f16 bits: a zeroed vector of integers is allocated zeroed by the system, so
/// capacity a session never fills costs address space, not memory.
struct LayerKv {
    k: Vec<u16>,
    v: Vec<u16>,
}

/// The shape of a session's cached rows: batch rows, KV heads and head size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's cached keys and values as attention reads them: rows `first..positions`
/// of each (batch row, KV head), `capacity` rows apart.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub shape: KvShape,
    pub capacity: usize,
    pub positions: usize,
    /// The first visible row: 0, or where a sliding window begins.
    pub first: usize,
}

impl KvView<'_> {
    /// Where the visible rows of batch row `b`, KV head `h` start.
    pub fn offset(&self, b: usize, h: usize) -> usize {
        ((b * self.shape.kv_heads + h) * self.capacity + self.first) * self.shape.head_dim
    }

    /// How many rows are visible.
    pub fn visible(&self) -> usize {
        self.positions.saturating_sub(self.first)
    }

    /// The last `window` rows only (a sliding-window layer's position sees no further
    /// back), of at least one row.
    pub fn window(self, window: usize) -> Self {
        Self {
            first: self.positions.saturating_sub(window.max(1)),
            ..self
        }
    }

    /// The first `positions` rows only (a prompt's position sees its causal prefix).
    pub fn prefix(self, positions: usize) -> Self {
        Self {
            positions: positions.min(self.positions),
            ..self
        }
    }
}

/// The KV caches of one session for the layers `range` of a shard.
pub struct ShardCache {
    range: LayerRange,
    layers: Vec<Option<LayerKv>>,
    /// Set by the first append; every later one must match.
    shape: Option<KvShape>,
    len: usize,
    capacity: usize,
    max_len: usize,
    batch: Option<usize>,
}

impl ShardCache {
    pub fn new(range: LayerRange, max_len: usize) -> Self {
        Self {
            range,
            layers: (0..range.len()).map(|_| None).collect(),
            shape: None,
            len: 0,
            capacity: 0,
            max_len,
            batch: None,
        }
    }

    /// The model layers this cache belongs to.
    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// Positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position from `positions` on; the next step writes over them.
    pub fn truncate(&mut self, positions: usize) {
        self.len = self.len.min(positions);
    }

    pub fn batch(&self) -> Option<usize> {
        self.batch
    }

    pub(crate) fn set_batch(&mut self, batch: usize) {
        self.batch = Some(batch);
    }

    /// Makes room for `extra` more positions in every layer (growing by whole chunks).
    pub(crate) fn reserve(&mut self, extra: usize) {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return;
        }
        let new_capacity = needed
            .div_ceil(CHUNK_POSITIONS)
            .saturating_mul(CHUNK_POSITIONS)
            .min(self.max_len)
            .max(needed);
        if let Some(shape) = self.shape {
            let (old, len) = (self.capacity, self.len);
            for layer in self.layers.iter_mut().flatten() {
                layer.k = grow(&layer.k, shape, (old, new_capacity), len);
                layer.v = grow(&layer.v, shape, (old, new_capacity), len);
            }
        }
        self.capacity = new_capacity;
    }

    /// Writes `seq` new positions of `layer` after the filled ones (room for them
    /// must have been reserved): `fill(b, h, t, key, value)` computes the f32 rows of
    /// batch row `b`, KV head `h`, new position `t`, which are then stored in f16.
    pub(crate) fn append_with(
        &mut self,
        layer: usize,
        shape: KvShape,
        seq: usize,
        mut fill: impl FnMut(usize, usize, usize, &mut [f32], &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        match self.shape {
            Some(known) if known != shape => {
                bail!("cache rows of shape {shape:?} do not fit the cache's {known:?}")
            }
            _ => self.shape = Some(shape),
        }
        if self.len + seq > self.capacity {
            bail!(
                "{seq} positions do not fit the cache ({} of {} used)",
                self.len,
                self.capacity
            );
        }
        let (capacity, len, hd) = (self.capacity, self.len, shape.head_dim);
        let Some(slot) = self.layers.get_mut(layer) else {
            bail!("layer {layer} is not in this cache");
        };
        let values = shape.batch * shape.kv_heads * capacity * hd;
        let kv = slot.get_or_insert_with(|| LayerKv {
            k: vec![0; values],
            v: vec![0; values],
        });
        let (mut key, mut value) = (vec![0f32; hd], vec![0f32; hd]);
        for b in 0..shape.batch {
            for h in 0..shape.kv_heads {
                let first = ((b * shape.kv_heads + h) * capacity + len) * hd;
                let keys = kv.k[first..][..seq * hd].reinterpret_cast_mut::<f16>();
                let values = kv.v[first..][..seq * hd].reinterpret_cast_mut::<f16>();
                let (keys, values) = (keys.chunks_exact_mut(hd), values.chunks_exact_mut(hd));
                for (t, (k, v)) in keys.zip(values).enumerate() {
                    fill(b, h, t, &mut key, &mut value)?;
                    k.convert_from_f32_slice(&key);
                    v.convert_from_f32_slice(&value);
                }
            }
        }
        Ok(())
    }

    /// `layer`'s keys and values, the first `positions` rows (filled ones and any
    /// appended since the last [`ShardCache::advance`]).
    pub(crate) fn view(&self, layer: usize, positions: usize) -> Result<KvView<'_>> {
        let (Some(shape), Some(Some(kv))) = (self.shape, self.layers.get(layer)) else {
            bail!("layer {layer} has nothing cached");
        };
        if positions == 0 || positions > self.capacity {
            bail!(
                "{positions} positions asked of a cache of {}",
                self.capacity
            );
        }
        Ok(KvView {
            k: kv.k.reinterpret_cast(),
            v: kv.v.reinterpret_cast(),
            shape,
            capacity: self.capacity,
            positions,
            first: 0,
        })
    }

    /// Marks `seq` positions as written, once every layer has appended them.
    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
    }
}

/// `old` rows per (batch row, KV head) as `capacity.1` rows, the first `len` kept.
fn grow(old: &[u16], shape: KvShape, (from, to): (usize, usize), len: usize) -> Vec<u16> {
    let hd = shape.head_dim;
    let mut bigger = vec![0; shape.batch * shape.kv_heads * to * hd];
    for i in 0..shape.batch * shape.kv_heads {
        bigger[i * to * hd..][..len * hd].copy_from_slice(&old[i * from * hd..][..len * hd]);
    }
    bigger
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            batch: 2,
            kv_heads: 3,
            head_dim: 4,
        }
    }

    /// A key row names its absolute position, a value row its batch row and head
    /// (small integers, exact in f16).
    fn row(b: usize, h: usize, pos: usize) -> (f32, f32) {
        (pos as f32, (b * 3 + h) as f32)
    }

    fn append(cache: &mut ShardCache, layer: usize, seq: usize) {
        let start = cache.len();
        cache.reserve(seq);
        cache
            .append_with(layer, shape(), seq, |b, h, t, k, v| {
                let (key, value) = row(b, h, start + t);
                k.fill(key);
                v.fill(value);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn keeps_every_row_across_growth() {
        let mut cache = ShardCache::new(LayerRange::new(0, 2), 1000);
        // Past two chunk boundaries, in uneven steps.
        for seq in [1, 200, 60, 1, 300] {
            for layer in 0..2 {
                append(&mut cache, layer, seq);
            }
            cache.advance(seq);
        }
        assert_eq!(cache.len(), 562);
        assert!(cache.capacity >= 562 && cache.capacity <= 1000);
        let view = cache.view(1, cache.len()).unwrap();
        for b in 0..2 {
            for h in 0..3 {
                for pos in 0..562 {
                    let at = view.offset(b, h) + pos * 4;
                    let (key, value) = row(b, h, pos);
                    assert_eq!(view.k[at..at + 4], [f16::from_f32(key); 4]);
                    assert_eq!(view.v[at..at + 4], [f16::from_f32(value); 4]);
                }
            }
        }
    }

    #[test]
    fn stores_rows_rounded_to_the_nearest_f16() {
        let mut cache = ShardCache::new(LayerRange::new(0, 1), 8);
        cache.reserve(1);
        // Inexact in f16: a third, a tie (1 + 2^-11 rounds to even, 1), a value past
        // f16's largest finite one, a subnormal.
        let key = [1.0 / 3.0, 1.0 + 2f32.powi(-11), 65_519.0, 1e-6];
        let one = KvShape {
            batch: 1,
            kv_heads: 1,
            head_dim: 4,
        };
        cache
            .append_with(0, one, 1, |_, _, _, k, v| {
                k.copy_from_slice(&key);
                v.copy_from_slice(&key.map(|x| -x));
                Ok(())
            })
            .unwrap();
        cache.advance(1);
        let view = cache.view(0, 1).unwrap();
        assert_eq!(view.k[..4], key.map(f16::from_f32));
        assert_eq!(view.v[..4], key.map(|x| f16::from_f32(-x)));
        assert_eq!(view.k[1], f16::ONE);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let mut cache = ShardCache::new(LayerRange::new(0, 1), 8);
        // Nothing reserved yet.
        let ok = |_: usize, _: usize, _: usize, _: &mut [f32], _: &mut [f32]| Ok(());
        assert!(cache.append_with(0, shape(), 1, ok).is_err());
        cache.reserve(2);
        assert!(
            cache.append_with(1, shape(), 1, ok).is_err(),
            "no such layer"
        );
        cache.append_with(0, shape(), 2, ok).unwrap();
        let other = KvShape {
            kv_heads: 2,
            ..shape()
        };
        assert!(cache.append_with(0, other, 1, ok).is_err(), "another shape");
        assert!(cache.view(0, 9).is_err());
        assert!(cache.view(0, 0).is_err());
    }
}
