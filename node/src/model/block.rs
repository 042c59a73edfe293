//! One transformer block: pre-norm grouped-query attention, then a pre-norm SwiGLU MLP.
//! Tensor names are llama.cpp's (`blk.N.attn_q.weight`, ...). What the architectures
//! change (fused tensors, Q/K/V biases, per-head Q/K norms, RoPE's pairing) is read
//! from the file and its [`Architecture`](super::arch::Architecture).

use std::sync::{Arc, Mutex};

use candle_core::quantized::QTensor;
use candle_core::{Device, Result, Tensor};

use super::attention::Step;
use super::gguf::{self, GgufFile};
use super::kernels::{rms_norm, swiglu as swiglu_row, Linear, Simd, Stacked};
use super::kv_cache::{KvShape, ShardCache};
use super::rope::Rope;
use super::{ModelConfig, ModelError};

/// Rows per task when a norm is split over the compute threads; up to this many rows
/// run on the calling thread alone (eight rows take one or two microseconds).
const NORM_ROWS_PER_TASK: usize = 32;

/// An RMS norm ([`kernels::rms_norm`](super::kernels::rms_norm)); its weight,
/// dequantized to f32 (it is tiny).
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(gguf: &mut GgufFile, name: &str, size: usize, eps: f32) -> LoadResult<Self> {
        let weight = load_vector(gguf, name, size)?;
        Ok(Self { weight, eps })
    }

    /// The norm of each row of `x` (`[..., size]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dims().last() != Some(&self.weight.len()) || self.weight.is_empty() {
            candle_core::bail!(
                "rows of {} values expected, got {:?}",
                self.weight.len(),
                x.dims()
            );
        }
        let size = self.weight.len();
        let out = super::with_values(x, |values| {
            super::map_rows(values, (size, size), NORM_ROWS_PER_TASK, |x, y| {
                rms_norm(x, &self.weight, self.eps, y)
            })
        })?;
        Tensor::from_vec(out, x.dims(), &candle_core::Device::Cpu)
    }

    /// `x + y` (the residual stream after a sublayer) and its norm.
    pub fn add_forward(&self, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let sum = add(x, y)?;
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }
}

/// `x + y`, element by element, for tensors of one shape.
fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.dims() != y.dims() {
        candle_core::bail!("cannot add {:?} and {:?}", x.dims(), y.dims());
    }
    let sum = super::with_values(x, |a| {
        super::with_values(y, |b| {
            a.iter().zip(b).map(|(a, b)| a + b).collect::<Vec<f32>>()
        })
    })??;
    Tensor::from_vec(sum, x.dims(), &candle_core::Device::Cpu)
}

type LoadResult<T> = std::result::Result<T, ModelError>;

/// A one-dimensional tensor of `size` values (a norm's weight, a bias), in f32.
fn load_vector(gguf: &mut GgufFile, name: &str, size: usize) -> LoadResult<Vec<f32>> {
    let t = load_checked(gguf, name, &[size], gguf::is_supported_norm_type)?;
    Ok(t.dequantize(&Device::Cpu)?.to_vec1::<f32>()?)
}

/// Reads a tensor after checking its type and shape (candle order: `[out, in]`).
pub fn load_checked(
    gguf: &mut GgufFile,
    name: &str,
    expected: &[usize],
    type_ok: fn(candle_core::quantized::GgmlDType) -> bool,
) -> LoadResult<QTensor> {
    let info = gguf
        .tensor_info(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if !type_ok(info.ggml_dtype) {
        return Err(ModelError::UnsupportedTensorType {
            tensor: Some(name.to_string()),
            dtype: format!("{:?}", info.ggml_dtype),
        });
    }
    if info.shape.dims() != expected {
        return Err(ModelError::TensorShape {
            name: name.to_string(),
            actual: info.shape.dims().to_vec(),
            expected: expected.to_vec(),
        });
    }
    gguf.tensor(name)
}

fn load_weights(
    gguf: &mut GgufFile,
    name: &str,
    out: usize,
    inp: usize,
) -> LoadResult<Arc<QTensor>> {
    let q = load_checked(gguf, name, &[out, inp], gguf::is_supported_weight_type)?;
    Ok(Arc::new(q))
}

fn load_matmul(gguf: &mut GgufFile, name: &str, out: usize, inp: usize) -> LoadResult<Linear> {
    Ok(Linear::new(load_weights(gguf, name, out, inp)?)?)
}

/// Q, K and V of layer `index`: one fused `attn_qkv` or three matrices, not both.
fn load_qkv(
    gguf: &mut GgufFile,
    index: usize,
    (d, q, kv): (usize, usize, usize),
) -> LoadResult<Vec<Arc<QTensor>>> {
    let name = |t: &str| format!("blk.{index}.{t}.weight");
    let fused = name("attn_qkv");
    if gguf.tensor_info(&fused).is_none() {
        return Ok(vec![
            load_weights(gguf, &name("attn_q"), q, d)?,
            load_weights(gguf, &name("attn_k"), kv, d)?,
            load_weights(gguf, &name("attn_v"), kv, d)?,
        ]);
    }
    if let Some(both) = ["attn_q", "attn_k", "attn_v"]
        .map(name)
        .into_iter()
        .find(|t| gguf.tensor_info(t).is_some())
    {
        return Err(ModelError::NotUnderstood(format!(
            "tensor {both} beside the fused {fused}: which one holds the weights is ambiguous"
        )));
    }
    Ok(vec![load_weights(gguf, &fused, q + 2 * kv, d)?])
}

/// The biases of layer `index`'s Q, K and V side by side: one fused
/// `attn_qkv.bias` or all three of `attn_{q,k,v}.bias`, or none.
fn load_qkv_bias(
    gguf: &mut GgufFile,
    index: usize,
    (q, kv): (usize, usize),
) -> LoadResult<Option<Vec<f32>>> {
    let name = |t: &str| format!("blk.{index}.{t}.bias");
    let parts = [("attn_q", q), ("attn_k", kv), ("attn_v", kv)];
    let present: Vec<bool> = parts
        .iter()
        .map(|(t, _)| gguf.tensor_info(&name(t)).is_some())
        .collect();
    let fused = name("attn_qkv");
    match (gguf.tensor_info(&fused).is_some(), &present[..]) {
        (false, [false, false, false]) => Ok(None),
        (true, [false, false, false]) => Ok(Some(load_vector(gguf, &fused, q + 2 * kv)?)),
        (false, [true, true, true]) => {
            let mut all = Vec::with_capacity(q + 2 * kv);
            for (t, size) in parts {
                all.extend(load_vector(gguf, &name(t), size)?);
            }
            Ok(Some(all))
        }
        _ => Err(ModelError::NotUnderstood(format!(
            "layer {index} has biases on some of Q, K and V only, or both fused and separate ones"
        ))),
    }
}

pub struct Attention {
    /// Q, K and V side by side: three matrices or one fused.
    qkv: Stacked,
    /// Biases of Q, K and V side by side, where the model has them.
    qkv_bias: Option<Vec<f32>>,
    /// Per-head RMS norms of queries and of keys before RoPE (Qwen 3).
    head_norms: Option<HeadNorms>,
    wo: Linear,
    head_count: usize,
    head_count_kv: usize,
    head_dim: usize,
}

/// The per-head query and key norms (`head_dim` weights each).
pub struct HeadNorms {
    q: RmsNorm,
    k: RmsNorm,
}

pub struct Mlp {
    /// Gate and up side by side: two matrices or one fused.
    gate_up: Stacked,
    down: Linear,
}

pub struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    pub fn load(gguf: &mut GgufFile, cfg: &ModelConfig, index: usize) -> LoadResult<Self> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        let (d, q, kv, ff) = (
            cfg.hidden_size,
            cfg.q_size(),
            cfg.kv_size(),
            cfg.feed_forward_size,
        );
        let gate_up = match cfg.arch.fused_gate_up {
            true => vec![load_weights(gguf, &name("ffn_up"), 2 * ff, d)?],
            false => vec![
                load_weights(gguf, &name("ffn_gate"), ff, d)?,
                load_weights(gguf, &name("ffn_up"), ff, d)?,
            ],
        };
        let head_norms = match cfg.arch.qk_norm {
            true => Some(HeadNorms {
                q: RmsNorm::load(gguf, &name("attn_q_norm"), cfg.head_dim, cfg.rms_eps)?,
                k: RmsNorm::load(gguf, &name("attn_k_norm"), cfg.head_dim, cfg.rms_eps)?,
            }),
            false => None,
        };
        Ok(Self {
            attn_norm: RmsNorm::load(gguf, &name("attn_norm"), d, cfg.rms_eps)?,
            attn: Attention {
                qkv: Stacked::new(load_qkv(gguf, index, (d, q, kv))?)?,
                qkv_bias: load_qkv_bias(gguf, index, (q, kv))?,
                head_norms,
                wo: load_matmul(gguf, &name("attn_output"), d, q)?,
                head_count: cfg.head_count,
                head_count_kv: cfg.head_count_kv,
                head_dim: cfg.head_dim,
            },
            ffn_norm: RmsNorm::load(gguf, &name("ffn_norm"), d, cfg.rms_eps)?,
            mlp: Mlp {
                gate_up: Stacked::new(gate_up)?,
                down: load_matmul(gguf, &name("ffn_down"), d, ff)?,
            },
        })
    }

    /// `x`: `[batch, tokens, hidden]`, the tokens of one or more sequences one after
    /// another (`parts`, each with its own cache); `layer` indexes this block's slot in
    /// the caches. Everything but attention runs once over all tokens; attention runs
    /// per part. Each token's result is the same as if its sequence ran alone.
    pub fn forward(
        &self,
        x: &Tensor,
        parts: &mut [Part<'_>],
        layer: usize,
        rope: &Rope,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("block", layer).entered();
        let attended = self
            .attn
            .forward(&self.attn_norm.forward(x)?, parts, layer, rope)?;
        let (h, normed) = self.ffn_norm.add_forward(x, &attended)?;
        add(&h, &self.mlp.forward(&normed)?)
    }
}

/// One sequence's share of a batched forward: tokens `start..start + len` of the input
/// and the sequence's cache.
pub struct Part<'a> {
    pub start: usize,
    pub len: usize,
    pub cache: &'a mut ShardCache,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up.forward(x)?;
        self.down.forward(&swiglu(&gate_up)?)
    }
}

/// Rows per task when SwiGLU is split over the compute threads; up to this many rows
/// run on the calling thread alone (a row takes about a tenth of a microsecond).
const SWIGLU_ROWS_PER_TASK: usize = 16;

/// `silu(gate) × up` for `[..., gate ‖ up]` (two halves of the last dimension), in one
/// pass ([`kernels::swiglu`](super::kernels::swiglu)).
fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let mut dims = gate_up.dims().to_vec();
    let ff = match dims.last_mut() {
        Some(width) if *width > 0 && width.is_multiple_of(2) => {
            *width /= 2;
            *width
        }
        _ => candle_core::bail!("gate and up expected side by side, got {dims:?}"),
    };
    let simd = Simd::in_use();
    let values = super::with_values(gate_up, |values| {
        super::map_rows(values, (2 * ff, ff), SWIGLU_ROWS_PER_TASK, |x, y| {
            for (row, y) in x.chunks_exact(2 * ff).zip(y.chunks_exact_mut(ff)) {
                let (gate, up) = row.split_at(ff);
                swiglu_row(gate, up, y, simd);
            }
        })
    })?;
    Tensor::from_vec(values, dims, &candle_core::Device::Cpu)
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        parts: &mut [Part<'_>],
        layer: usize,
        rope: &Rope,
    ) -> Result<Tensor> {
        let mut qkv = self.qkv.forward(x)?;
        let (b, tokens, width) = qkv.dims3()?;
        let (nh, nkv, hd) = (self.head_count, self.head_count_kv, self.head_dim);
        if width != (nh + 2 * nkv) * hd {
            candle_core::bail!("Q, K and V expected side by side, got width {width}");
        }
        if let Some(bias) = &self.qkv_bias {
            let biased = super::with_values(&qkv, |values| {
                let rows = values.chunks_exact(width);
                rows.flat_map(|row| row.iter().zip(bias).map(|(v, b)| v + b))
                    .collect::<Vec<f32>>()
            })?;
            qkv = Tensor::from_vec(biased, (b, tokens, width), &Device::Cpu)?;
        }
        let y = super::with_values(&qkv, |values| -> Result<Vec<f32>> {
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
                    let slots: Vec<Mutex<&mut Part<'_>>> =
                        parts.iter_mut().map(Mutex::new).collect();
                    super::parallel_map(&slots, |slot| {
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
                    steps.push(Step {
                        q,
                        heads: nh,
                        cache,
                    });
                }
            }
            let outputs = super::attention::single_positions(&steps)?;
            // `[batch, tokens, heads × head_dim]`, the parts' tokens in order.
            let mut y = vec![0f32; b * tokens * d];
            let tokens_of_parts = parts.iter().flat_map(|p| p.start..p.start + p.len);
            for (token, out) in tokens_of_parts.zip(&outputs) {
                for (bi, out) in out.chunks_exact(d).enumerate() {
                    y[(bi * tokens + token) * d..][..d].copy_from_slice(out);
                }
            }
            Ok(y)
        })??;
        self.wo
            .forward(&Tensor::from_vec(y, (b, tokens, nh * hd), &Device::Cpu)?)
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
                rms_norm(x, &n.weight, n.eps, &mut normed);
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
