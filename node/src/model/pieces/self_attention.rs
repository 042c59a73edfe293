//! Causal self-attention of new tokens over a session's cache: queries and keys
//! (normed per head where the architecture norms them) rotated by RoPE, keys and
//! values appended to each sequence's cache, then every new position attended against
//! its causal prefix ([`attention`](crate::model::attention)). Q, K and V come in side
//! by side from [`Qkv`](super::qkv::Qkv); the output projection is the caller's.

use std::sync::Mutex;

use candle_core::Result;

use super::norm::{HeadNorms, RmsNorm};
use super::Part;
use crate::model::attention::Step;
use crate::model::kv_cache::KvShape;
use crate::model::rope::Rope;
use crate::model::{Hidden, ModelConfig};

pub struct SelfAttention {
    head_count: usize,
    head_count_kv: usize,
    head_dim: usize,
    /// Per-head RMS norms of queries and of keys before RoPE, where the model has them.
    head_norms: Option<HeadNorms>,
    /// What scores are multiplied by.
    scale: f32,
    /// `cap × tanh(score / cap)` on the scaled scores, where the model caps them.
    softcap: Option<f32>,
    /// A sliding-window layer's window: each position sees itself and the `window - 1`
    /// before it.
    window: Option<usize>,
}

impl SelfAttention {
    pub fn new(cfg: &ModelConfig, head_norms: Option<HeadNorms>) -> Self {
        Self {
            head_count: cfg.head_count,
            head_count_kv: cfg.head_count_kv,
            head_dim: cfg.head_dim,
            head_norms,
            scale: cfg
                .attention_scale
                .unwrap_or_else(|| 1.0 / (cfg.head_dim as f32).sqrt()),
            softcap: cfg.attention_logit_softcap,
            window: None,
        }
    }

    /// This attention over the last `window` positions only.
    pub fn windowed(self, window: usize) -> Self {
        Self {
            window: Some(window),
            ..self
        }
    }

    /// `qkv`: `[batch, tokens, (heads + 2 kv_heads) × head_dim]`, the tokens of one or
    /// more sequences one after another (`parts`, each with its own cache); `layer`
    /// indexes this layer's slot in the caches. Gives `[batch, tokens, heads ×
    /// head_dim]`; each token's result is the same as if its sequence ran alone.
    pub fn forward(
        &self,
        qkv: &Hidden,
        parts: &mut [Part<'_>],
        layer: usize,
        rope: &Rope,
    ) -> Result<Hidden> {
        let (b, tokens, width) = qkv.dims();
        let (nh, nkv, hd) = (self.head_count, self.head_count_kv, self.head_dim);
        if width != (nh + 2 * nkv) * hd {
            candle_core::bail!("Q, K and V expected side by side, got width {width}");
        }
        let values = qkv.values();
        // Each sequence's rows rotated and its keys and values written into its
        // cache, then the attention of every new position (against its causal
        // prefix of the cache) of every sequence at once across the compute
        // threads: a prompt's positions and a batch's decode steps alike, with the
        // same arithmetic as one decode step. Several sequences (a batch of decode
        // steps) on every compute thread. If one fails, the others have still
        // written this layer's rows past their caches' ends; no cache advances
        // (the forward fails), so the next step overwrites them.
        let rotate =
            |part: &mut Part<'_>| self.rotate_and_cache(values, (b, tokens), part, layer, rope);
        let queries = match &mut *parts {
            [part] => vec![rotate(part)?],
            parts => {
                let slots: Vec<Mutex<&mut Part<'_>>> = parts.iter_mut().map(Mutex::new).collect();
                crate::model::parallel_map(&slots, |slot| {
                    // Each slot is locked once, by one thread: never contended.
                    let mut part = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    rotate(&mut part)
                })
                .into_iter()
                .collect::<Result<Vec<_>>>()?
            }
        };
        let d = nh * hd;
        let mut steps = Vec::with_capacity(tokens);
        for (part, q) in parts.iter().zip(&queries) {
            let filled = part.cache.len() + part.len;
            let cache = part.cache.view(layer, filled)?;
            for (t, q) in q.chunks_exact(b * d).enumerate() {
                // Position `filled - len + t` sees the cache up to itself.
                let cache = cache.prefix(filled - part.len + t + 1);
                let cache = match self.window {
                    Some(w) => cache.window(w),
                    None => cache,
                };
                steps.push(Step {
                    q,
                    heads: nh,
                    cache,
                    scale: self.scale,
                    softcap: self.softcap,
                });
            }
        }
        let outputs = crate::model::attention::single_positions(&steps)?;
        // `[batch, tokens, heads × head_dim]`, the parts' tokens in order.
        let mut y = vec![0f32; b * tokens * d];
        let tokens_of_parts = parts.iter().flat_map(|p| p.start..p.start + p.len);
        for (token, out) in tokens_of_parts.zip(&outputs) {
            for (bi, out) in out.chunks_exact(d).enumerate() {
                y[(bi * tokens + token) * d..][..d].copy_from_slice(out);
            }
        }
        qkv.with_rows(y, d)
    }

    /// One sequence's rows of Q, K and V (side by side in `qkv`, `[batch, tokens,
    /// (heads + 2 kv_heads) × head_dim]`, the sequence's tokens `part.start..` of them): K
    /// rotated and V written straight into the sequence's cache, Q rotated and
    /// returned as `[seq, batch, heads, head_dim]`, so that each position's queries
    /// lie together.
    fn rotate_and_cache(
        &self,
        qkv: &[f32],
        (b, tokens): (usize, usize),
        part: &mut Part<'_>,
        layer: usize,
        rope: &Rope,
    ) -> Result<Vec<f32>> {
        let (nh, nkv, hd) = (self.head_count, self.head_count_kv, self.head_dim);
        let width = (nh + 2 * nkv) * hd;
        let (start, seq) = (part.start, part.len);
        if start + seq > tokens || qkv.len() != b * tokens * width {
            candle_core::bail!("tokens {start}..{} are not among {tokens}", start + seq);
        }
        let pos = part.cache.len();
        let row = |bi: usize, t: usize, head: usize| {
            &qkv[(bi * tokens + start + t) * width + head * hd..][..hd]
        };
        // A head's row, normed where the model norms heads, then rotated.
        let mut normed = vec![0f32; hd];
        let mut rotate = |x: &[f32], norm: Option<&RmsNorm>, out: &mut [f32], pos: usize| match norm
        {
            Some(n) => {
                n.forward_row(x, &mut normed);
                rope.rotate_into(&normed, out, pos)
            }
            None => rope.rotate_into(x, out, pos),
        };
        let q_norm = self.head_norms.as_ref().map(|n| &n.q);
        let k_norm = self.head_norms.as_ref().map(|n| &n.k);
        let mut q = vec![0f32; seq * b * nh * hd];
        for (i, out) in q.chunks_exact_mut(hd).enumerate() {
            let (t, bi, h) = (i / (b * nh), i / nh % b, i % nh);
            rotate(row(bi, t, h), q_norm, out, pos + t)?;
        }
        let shape = KvShape {
            batch: b,
            kv_heads: nkv,
            head_dim: hd,
        };
        part.cache
            .append_with(layer, shape, seq, |bi, h, t, key, value| {
                rotate(row(bi, t, nh + h), k_norm, key, pos + t)?;
                value.copy_from_slice(row(bi, t, nh + nkv + h));
                Ok(())
            })?;
        Ok(q)
    }
}
