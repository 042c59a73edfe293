//! Llama 2 and 3.x, Mistral, TinyLlama, SmolLM: the base layout, as llama.cpp's
//! `llama`. Pre-norm attention with RoPE over adjacent pairs (llama.cpp's converter
//! permutes Llama's Q and K rows for it), then a pre-norm SwiGLU feed-forward. Llama
//! 3.1's RoPE frequency factors and linear or YaRN RoPE scaling are read for every
//! architecture here.

use super::{Architecture, Layer};
use crate::model::config::{read_llama_style, LLAMA_KEYS};
use crate::model::gguf::GgufFile;
use crate::model::kernels::Linear;
use crate::model::pieces::ffn::{self, Activation, GatedFfn};
use crate::model::pieces::load::load_matmul;
use crate::model::pieces::norm::{HeadNorms, RmsNorm};
use crate::model::pieces::qkv::{self, Qkv};
use crate::model::pieces::self_attention::SelfAttention;
use crate::model::pieces::Part;
use crate::model::rope::{Rope, RopeStyle};
use crate::model::{Hidden, ModelConfig, ModelError};

pub struct Llama;

impl Architecture for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn metadata_keys(&self) -> Vec<&'static str> {
        LLAMA_KEYS.to_vec()
    }

    fn read_config(&'static self, gguf: &GgufFile) -> Result<ModelConfig, ModelError> {
        read_llama_style(gguf, self, RopeStyle::Adjacent)
    }

    fn layer_tensors(&self) -> Vec<&'static str> {
        let norms = ["attn_norm.weight", "attn_output.weight", "ffn_norm.weight"];
        [&norms[..], qkv::TENSORS, ffn::SEPARATE_TENSORS].concat()
    }

    fn load_layer(
        &self,
        gguf: &mut GgufFile,
        cfg: &ModelConfig,
        index: usize,
    ) -> Result<Box<dyn Layer>, ModelError> {
        Ok(Box::new(LlamaLayer::load(
            gguf,
            cfg,
            index,
            Variant::default(),
        )?))
    }
}

/// The tensors by which another architecture's Llama-style layer differs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Variant {
    /// Per-head RMS norms of queries and keys (`attn_q_norm`, `attn_k_norm`), applied
    /// to each head just before its rotation.
    pub head_norms: bool,
    /// Gate and up fused in one `ffn_up` of twice the width, gate first.
    pub fused_gate_up: bool,
}

/// Also the layer of Qwen 2 (which differs only in RoPE's pairing, which the shard's
/// [`Rope`] carries), Qwen 3 and Phi-3 (which differ in their tensors: [`Variant`]).
pub struct LlamaLayer {
    attn_norm: RmsNorm,
    qkv: Qkv,
    attention: SelfAttention,
    attn_output: Linear,
    ffn_norm: RmsNorm,
    ffn: GatedFfn,
}

impl LlamaLayer {
    pub fn load(
        gguf: &mut GgufFile,
        cfg: &ModelConfig,
        index: usize,
        variant: Variant,
    ) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        let (d, q, kv, ff) = (
            cfg.hidden_size,
            cfg.q_size(),
            cfg.kv_size(),
            cfg.feed_forward_size,
        );
        let head_norms = match variant.head_norms {
            true => Some(HeadNorms::load(gguf, index, cfg.head_dim, cfg.rms_eps)?),
            false => None,
        };
        let ffn = match variant.fused_gate_up {
            true => GatedFfn::load_fused(gguf, index, (d, ff), Activation::Silu)?,
            false => GatedFfn::load_separate(gguf, index, (d, ff), Activation::Silu)?,
        };
        Ok(Self {
            attn_norm: RmsNorm::load(gguf, &name("attn_norm"), d, cfg.rms_eps)?,
            qkv: Qkv::load(gguf, index, (d, q, kv))?,
            attention: SelfAttention::new(cfg, head_norms),
            attn_output: load_matmul(gguf, &name("attn_output"), d, q)?,
            ffn_norm: RmsNorm::load(gguf, &name("ffn_norm"), d, cfg.rms_eps)?,
            ffn,
        })
    }
}

impl Layer for LlamaLayer {
    fn forward(
        &self,
        x: Hidden,
        parts: &mut [Part<'_>],
        layer: usize,
        rope: &Rope,
    ) -> candle_core::Result<Hidden> {
        let _span = tracing::trace_span!("block", layer).entered();
        let qkv = self.qkv.forward(&self.attn_norm.forward(&x)?)?;
        let attended = self.attention.forward(&qkv, parts, layer, rope)?;
        let (h, normed) = self
            .ffn_norm
            .add_forward(&self.attn_output.apply(&attended)?, x)?;
        let mut out = self.ffn.forward(&normed)?;
        out.add(&h)?;
        Ok(out)
    }
}
