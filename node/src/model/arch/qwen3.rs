//! Qwen 3 (dense), as llama.cpp's `qwen3`: Llama's layer with per-head RMS norms of
//! queries and keys before RoPE, RoPE over halves, and a head size of its own
//! (`attention.key_length`), not width / heads.

use candle_core::Tensor;

use super::{Architecture, Layer};
use crate::model::config::{read_llama_style, LLAMA_KEYS};
use crate::model::gguf::GgufFile;
use crate::model::kernels::Linear;
use crate::model::pieces::ffn::{self, Activation, GatedFfn};
use crate::model::pieces::load::load_matmul;
use crate::model::pieces::norm::{HeadNorms, RmsNorm};
use crate::model::pieces::qkv::{self, Qkv};
use crate::model::pieces::self_attention::SelfAttention;
use crate::model::pieces::{residual, Part};
use crate::model::rope::{Rope, RopeStyle};
use crate::model::{ModelConfig, ModelError};

pub struct Qwen3;

impl Architecture for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }

    fn metadata_keys(&self) -> Vec<&'static str> {
        LLAMA_KEYS.to_vec()
    }

    fn read_config(&'static self, gguf: &GgufFile) -> Result<ModelConfig, ModelError> {
        read_llama_style(gguf, self, RopeStyle::Halves)
    }

    fn layer_tensors(&self) -> Vec<&'static str> {
        let own = [
            "attn_norm.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "attn_output.weight",
            "ffn_norm.weight",
        ];
        [&own[..], qkv::TENSORS, ffn::SEPARATE_TENSORS].concat()
    }

    fn load_layer(
        &self,
        gguf: &mut GgufFile,
        cfg: &ModelConfig,
        index: usize,
    ) -> Result<Box<dyn Layer>, ModelError> {
        Ok(Box::new(Qwen3Layer::load(gguf, cfg, index)?))
    }
}

struct Qwen3Layer {
    attn_norm: RmsNorm,
    qkv: Qkv,
    /// With the per-head norms (`attn_q_norm`, `attn_k_norm`), applied to each head
    /// just before its rotation.
    attention: SelfAttention,
    attn_output: Linear,
    ffn_norm: RmsNorm,
    ffn: GatedFfn,
}

impl Qwen3Layer {
    fn load(gguf: &mut GgufFile, cfg: &ModelConfig, index: usize) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        let (d, q, kv, ff) = (
            cfg.hidden_size,
            cfg.q_size(),
            cfg.kv_size(),
            cfg.feed_forward_size,
        );
        let head_norms = HeadNorms::load(gguf, index, cfg.head_dim, cfg.rms_eps)?;
        Ok(Self {
            attn_norm: RmsNorm::load(gguf, &name("attn_norm"), d, cfg.rms_eps)?,
            qkv: Qkv::load(gguf, index, (d, q, kv))?,
            attention: SelfAttention::new(cfg, Some(head_norms)),
            attn_output: load_matmul(gguf, &name("attn_output"), d, q)?,
            ffn_norm: RmsNorm::load(gguf, &name("ffn_norm"), d, cfg.rms_eps)?,
            ffn: GatedFfn::load_separate(gguf, index, (d, ff), Activation::Silu)?,
        })
    }
}

impl Layer for Qwen3Layer {
    fn forward(
        &self,
        x: &Tensor,
        parts: &mut [Part<'_>],
        layer: usize,
        rope: &Rope,
    ) -> candle_core::Result<Tensor> {
        let _span = tracing::trace_span!("block", layer).entered();
        let qkv = self.qkv.forward(&self.attn_norm.forward(x)?)?;
        let attended = self.attention.forward(&qkv, parts, layer, rope)?;
        let (h, normed) = self
            .ffn_norm
            .add_forward(x, &self.attn_output.forward(&attended)?)?;
        residual::add(&h, &self.ffn.forward(&normed)?)
    }
}
