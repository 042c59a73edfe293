//! The Q/K/V projection: three matrices or one fused `attn_qkv`, with biases on all
//! three or none (llama.cpp reads both layouts and the biases for every architecture
//! here), giving queries, keys and values side by side in each row.

use std::sync::Arc;

use candle_core::Result;

use super::load::{load_vector, load_weights, LoadResult};
use crate::model::gguf::GgufFile;
use crate::model::kernels::Stacked;
use crate::model::tensor_type::StoredTensor;
use crate::model::{Hidden, ModelError};

/// The per-layer tensors (`blk.N.<name>`) this piece may read; the loader checks that
/// one complete set is there.
pub const TENSORS: &[&str] = &[
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_qkv.weight",
    "attn_q.bias",
    "attn_k.bias",
    "attn_v.bias",
    "attn_qkv.bias",
];

pub struct Qkv {
    /// Q, K and V side by side: three matrices or one fused.
    weights: Stacked,
    /// Biases of Q, K and V side by side, where the model has them.
    bias: Option<Vec<f32>>,
}

impl Qkv {
    /// Layer `index`'s projection from width `d` to `q` query and `kv` key and value
    /// values.
    pub fn load(
        gguf: &mut GgufFile,
        index: usize,
        (d, q, kv): (usize, usize, usize),
    ) -> LoadResult<Self> {
        Ok(Self {
            weights: Stacked::new(load_matrices(gguf, index, (d, q, kv))?)?,
            bias: load_bias(gguf, index, (q, kv))?,
        })
    }

    /// `[batch, tokens, q + 2 kv]` for `x` (`[batch, tokens, d]`).
    pub fn forward(&self, x: &Hidden) -> Result<Hidden> {
        let mut qkv = self.weights.apply(x)?;
        let Some(bias) = &self.bias else {
            return Ok(qkv);
        };
        let width = qkv.width();
        if width != bias.len() {
            candle_core::bail!("Q, K and V of width {width} for {} biases", bias.len());
        }
        for row in qkv.values_mut().chunks_exact_mut(width) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
        Ok(qkv)
    }
}

/// Q, K and V of layer `index`: one fused `attn_qkv` or three matrices, not both.
fn load_matrices(
    gguf: &mut GgufFile,
    index: usize,
    (d, q, kv): (usize, usize, usize),
) -> LoadResult<Vec<Arc<StoredTensor>>> {
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
fn load_bias(
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
