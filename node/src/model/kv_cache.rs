//! Per-session key/value caches for the layers of one shard.
//!
//! Storage grows in chunks of [`CHUNK_POSITIONS`] and is written in place, so a
//! decode step neither re-allocates nor copies the history; a session that only
//! ever uses 100 positions never pays for the model's full context.

use allmende_protocol::LayerRange;
use candle_core::{DType, Device, Result, Tensor};

/// Positions added each time a cache grows.
pub const CHUNK_POSITIONS: usize = 256;

/// Keys and values of one layer: `[batch, kv_heads, capacity, head_dim]`, of which
/// the first `len` positions along dim 2 are filled.
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// The KV caches of one session for the layers `range` of a shard.
pub struct ShardCache {
    range: LayerRange,
    layers: Vec<Option<LayerKv>>,
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

    pub fn batch(&self) -> Option<usize> {
        self.batch
    }

    pub(crate) fn set_batch(&mut self, batch: usize) {
        self.batch = Some(batch);
    }

    /// Makes room for `extra` more positions in every layer (growing by whole chunks).
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        let new_capacity = needed
            .div_ceil(CHUNK_POSITIONS)
            .saturating_mul(CHUNK_POSITIONS)
            .min(self.max_len)
            .max(needed);
        for layer in self.layers.iter_mut().flatten() {
            layer.k = grow(&layer.k, self.len, new_capacity)?;
            layer.v = grow(&layer.v, self.len, new_capacity)?;
        }
        self.capacity = new_capacity;
        Ok(())
    }

    /// Writes `k`, `v` (`[batch, kv_heads, seq, head_dim]`) for `layer` at the current
    /// position and returns views of the whole filled history, without copying it.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, kv_heads, seq, head_dim) = k.dims4()?;
        let capacity = self.capacity;
        let kv = match &mut self.layers[layer] {
            Some(kv) => kv,
            slot => {
                let zeros =
                    || Tensor::zeros((b, kv_heads, capacity, head_dim), DType::F32, &Device::Cpu);
                slot.insert(LayerKv {
                    k: zeros()?,
                    v: zeros()?,
                })
            }
        };
        kv.k.slice_set(k, 2, self.len)?;
        kv.v.slice_set(v, 2, self.len)?;
        let filled = self.len + seq;
        Ok((kv.k.narrow(2, 0, filled)?, kv.v.narrow(2, 0, filled)?))
    }

    /// Marks `seq` positions as written, once every layer has appended them.
    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
    }
}

fn grow(t: &Tensor, len: usize, capacity: usize) -> Result<Tensor> {
    let (b, h, _, d) = t.dims4()?;
    let bigger = Tensor::zeros((b, h, capacity, d), t.dtype(), t.device())?;
    if len > 0 {
        bigger.slice_set(&t.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
    }
    Ok(bigger)
}
