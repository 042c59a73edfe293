//! A shard: layers `[start, end)` of a model, loaded from GGUF without reading the
//! rest, run over hidden states with a caller-owned [`ShardCache`].

use std::path::Path;

use allmende_protocol::LayerRange;
use candle_core::Tensor;
use indicatif::ProgressBar;

use super::arch::Layer;
use super::gguf::GgufFile;
use super::kv_cache::ShardCache;
use super::pieces::Part;
use super::rope::Rope;
use super::{ForwardError, Hidden, ModelConfig, ModelError};

pub struct Shard {
    config: ModelConfig,
    range: LayerRange,
    /// One per layer of the range, as its architecture computes it.
    blocks: Vec<Box<dyn Layer>>,
    rope: Rope,
}

impl Shard {
    /// Loads layers `range` of the model at `path`; `progress` counts bytes read.
    pub fn load(
        path: &Path,
        range: LayerRange,
        progress: &ProgressBar,
    ) -> Result<Self, ModelError> {
        let mut gguf = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&gguf)?;
        Self::from_gguf(&mut gguf, config, range, progress)
    }

    pub fn from_gguf(
        gguf: &mut GgufFile,
        config: ModelConfig,
        range: LayerRange,
        progress: &ProgressBar,
    ) -> Result<Self, ModelError> {
        range.validate(config.block_count as u32)?;
        let bytes: u64 = range.iter().map(|i| layer_bytes(gguf, i as usize)).sum();
        progress.set_length(bytes);
        let mut blocks = Vec::with_capacity(range.len() as usize);
        for index in range.iter() {
            blocks.push(config.arch.load_layer(gguf, &config, index as usize)?);
            progress.inc(layer_bytes(gguf, index as usize));
        }
        let factors = rope_factors(gguf, &config)?;
        let mut rope = Rope::new(config.rope(), config.context_length, factors.as_deref())?;
        if let Some(local) = config.rope_local {
            rope = rope.with_local(Rope::new(local, config.context_length, None)?);
        }
        Ok(Self {
            config,
            range,
            blocks,
            rope,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// A fresh cache for one session over all of this shard's layers, of at most
    /// `max_len` positions (capped at the model's context length).
    pub fn new_cache(&self, max_len: usize) -> ShardCache {
        ShardCache::new(self.range, max_len.min(self.config.context_length))
    }

    /// A fresh cache for a session over `layers`, which must lie within this shard: a
    /// route may use only part of a server's range.
    pub fn new_cache_for(&self, layers: LayerRange, max_len: usize) -> Option<ShardCache> {
        let inside =
            !layers.is_empty() && self.range.start <= layers.start && layers.end <= self.range.end;
        inside.then(|| ShardCache::new(layers, max_len.min(self.config.context_length)))
    }

    /// Runs the layers of `cache`'s range over `hidden` (`[batch, seq, hidden_size]`)
    /// for the session whose history is `cache`, and returns hidden states of the same
    /// shape. On error the cache is left as it was.
    pub fn forward(&self, hidden: &Tensor, cache: &mut ShardCache) -> Result<Tensor, ForwardError> {
        self.check(hidden, cache)?;
        let mut outputs = self.forward_checked(&mut [(hidden, cache)])?;
        Ok(outputs.remove(0))
    }

    /// Whether [`Shard::forward`] accepts `hidden` for `cache`.
    pub fn check(&self, hidden: &Tensor, cache: &ShardCache) -> Result<(), ForwardError> {
        let (batch, seq) = match hidden.dims() {
            &[b, s, h] if h == self.config.hidden_size && b > 0 && s > 0 => (b, s),
            dims => {
                return Err(ForwardError::Shape {
                    actual: dims.to_vec(),
                    hidden_size: self.config.hidden_size,
                })
            }
        };
        let range = cache.range();
        if range.start < self.range.start || range.end > self.range.end {
            return Err(ForwardError::Range {
                cache: range,
                shard: self.range,
            });
        }
        match cache.batch() {
            Some(expected) if expected != batch => {
                return Err(ForwardError::Batch {
                    actual: batch,
                    expected,
                })
            }
            _ => {}
        }
        if cache.len() + seq > cache.max_len() {
            return Err(ForwardError::ContextFull {
                used: cache.len(),
                requested: seq,
                max: cache.max_len(),
            });
        }
        Ok(())
    }

    /// Whether steps for these caches can share one [`Shard::forward_batch`]: the
    /// same layers, one sequence each.
    pub fn can_batch(a: &ShardCache, b: &ShardCache) -> bool {
        a.range() == b.range() && a.batch().unwrap_or(1) == 1 && b.batch().unwrap_or(1) == 1
    }

    /// Several sessions' steps as one forward (continuous batching): every job must
    /// pass [`Shard::check`], have batch size 1, and share its layer range with the
    /// others ([`Shard::can_batch`]). Each output equals what [`Shard::forward`] gives
    /// for that job alone, bit for bit. On error no cache advances.
    pub fn forward_batch(
        &self,
        jobs: &mut [(&Tensor, &mut ShardCache)],
    ) -> Result<Vec<Tensor>, ForwardError> {
        for (hidden, cache) in jobs.iter() {
            self.check(hidden, cache)?;
        }
        let batchable = jobs.windows(2).all(|w| Self::can_batch(w[0].1, w[1].1))
            && jobs.iter().all(|(h, _)| h.dims()[0] == 1);
        if !batchable && jobs.len() > 1 {
            return Err(ForwardError::Candle(candle_core::Error::Msg(
                "steps of different layer ranges or batch sizes cannot share a forward".into(),
            )));
        }
        self.forward_checked(jobs)
    }

    /// Runs on the caller's thread: the parallel parts inside spread over candle's
    /// barrier pool from any thread (no candle operation in the forward uses rayon
    /// since the norms are this crate's own, so there is no pool to hop onto).
    fn forward_checked(
        &self,
        jobs: &mut [(&Tensor, &mut ShardCache)],
    ) -> Result<Vec<Tensor>, ForwardError> {
        let Some((first, _)) = jobs.first() else {
            return Ok(Vec::new());
        };
        let batch = first.dims()[0];
        let range = jobs[0].1.range();
        // The one copy into the layers' own type; the layers reuse its memory.
        let inputs: Vec<&Tensor> = jobs.iter().map(|(h, _)| *h).collect();
        let mut x = Hidden::from_tensors(&inputs)?;
        let mut parts = Vec::with_capacity(jobs.len());
        let mut start = 0;
        for (hidden, cache) in jobs.iter_mut() {
            let seq = hidden.dims()[1];
            cache.set_batch(batch);
            cache.reserve(seq);
            parts.push(Part {
                start,
                len: seq,
                cache,
            });
            start += seq;
        }
        let first_layer = range.start.saturating_sub(self.range.start) as usize;
        let blocks = self
            .blocks
            .iter()
            .skip(first_layer)
            .take(range.len() as usize);
        for (layer, block) in blocks.enumerate() {
            x = block.forward(x, &mut parts, layer, &self.rope)?;
        }
        let outputs = match parts.as_slice() {
            [_] => vec![x.into_tensor()?],
            parts => parts
                .iter()
                .map(|p| x.positions(p.start, p.len)?.into_tensor())
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        for part in parts {
            part.cache.advance(part.len);
        }
        Ok(outputs)
    }
}

/// Llama 3.1's RoPE frequency factors (`rope_freqs.weight`, one per rotated pair),
/// where the model has them.
fn rope_factors(gguf: &mut GgufFile, config: &ModelConfig) -> Result<Option<Vec<f32>>, ModelError> {
    const NAME: &str = "rope_freqs.weight";
    if gguf.tensor_info(NAME).is_none() {
        return Ok(None);
    }
    let q = super::pieces::load::load_checked(gguf, NAME, &[config.head_dim / 2], |t| {
        t == super::tensor_type::TensorType::F32
    })?;
    let values = q
        .to_candle()
        .and_then(|q| q.dequantize(&candle_core::Device::Cpu))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| ModelError::Candle(super::candle_message(&e)))?;
    Ok(Some(values))
}

/// Bytes layer `index`'s weights hold in memory once loaded (norms and biases as
/// f32, matrices in their kernels' layout), from the file's tensor table alone.
pub fn layer_resident_bytes(gguf: &GgufFile, index: usize) -> u64 {
    let prefix = format!("blk.{index}.");
    gguf.tensor_names()
        .filter(|name| name.starts_with(&prefix))
        .filter_map(|name| gguf.tensor_info(name))
        .map(|info| match info.shape[..] {
            [rows, cols] => crate::model::kernels::resident_bytes(info.dtype, rows, cols),
            ref dims => 4 * dims.iter().product::<usize>() as u64,
        })
        .sum()
}

/// Bytes on disk of layer `index`'s tensors.
pub fn layer_bytes(gguf: &GgufFile, index: usize) -> u64 {
    let prefix = format!("blk.{index}.");
    gguf.tensor_names()
        .filter(|name| name.starts_with(&prefix))
        .map(|name| gguf.tensor_bytes(name))
        .sum()
}
