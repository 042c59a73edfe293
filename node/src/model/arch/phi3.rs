//! Phi-3 (mini and medium, 4k context), as llama.cpp's `phi3`: Llama's layer with Q, K
//! and V fused into one `attn_qkv`, gate and up fused into one `ffn_up`, RoPE over
//! halves, and a sliding window. The 128k variants' long/short RoPE factors are not
//! among its tensors, so they are refused.

use candle_core::Tensor;

use super::{Architecture, Layer};
use crate::model::config::{read_llama_style, LLAMA_KEYS};
use crate::model::gguf::GgufFile;
use crate::model::kernels::Linear;
use crate::model::pieces::ffn::{self, Activation, GatedFfn};
use crate::model::pieces::load::load_matmul;
use crate::model::pieces::norm::RmsNorm;
use crate::model::pieces::qkv::{self, Qkv};
use crate::model::pieces::self_attention::SelfAttention;
use crate::model::pieces::{residual, Part};
use crate::model::rope::{Rope, RopeStyle};
use crate::model::{ModelConfig, ModelError};

pub struct Phi3;

/// Its sliding attention window: sessions are capped to it, where full and windowed
/// attention agree (llama.cpp computes full attention for these files).
const SLIDING_WINDOW: &str = "attention.sliding_window";

impl Architecture for Phi3 {
    fn name(&self) -> &'static str {
        "phi3"
    }

    fn metadata_keys(&self) -> Vec<&'static str> {
        [LLAMA_KEYS, &[SLIDING_WINDOW]].concat()
    }

    fn read_config(&'static self, gguf: &GgufFile) -> Result<ModelConfig, ModelError> {
        let mut config = read_llama_style(gguf, self, RopeStyle::Halves)?;
        let window = format!("phi3.{SLIDING_WINDOW}");
        if gguf.has(&window) && gguf.usize(&window)? > 0 {
            config.context_length = config.context_length.min(gguf.usize(&window)?);
        }
        Ok(config)
    }

    fn layer_tensors(&self) -> Vec<&'static str> {
        let norms = ["attn_norm.weight", "attn_output.weight", "ffn_norm.weight"];
        [&norms[..], qkv::TENSORS, ffn::FUSED_TENSORS].concat()
    }

    fn load_layer(
        &self,
        gguf: &mut GgufFile,
        cfg: &ModelConfig,
        index: usize,
    ) -> Result<Box<dyn Layer>, ModelError> {
        Ok(Box::new(Phi3Layer::load(gguf, cfg, index)?))
    }
}

struct Phi3Layer {
    attn_norm: RmsNorm,
    qkv: Qkv,
    attention: SelfAttention,
    attn_output: Linear,
    ffn_norm: RmsNorm,
    /// Gate and up fused in `ffn_up`, gate first.
    ffn: GatedFfn,
}

impl Phi3Layer {
    fn load(gguf: &mut GgufFile, cfg: &ModelConfig, index: usize) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        let (d, q, kv, ff) = (
            cfg.hidden_size,
            cfg.q_size(),
            cfg.kv_size(),
            cfg.feed_forward_size,
        );
        Ok(Self {
            attn_norm: RmsNorm::load(gguf, &name("attn_norm"), d, cfg.rms_eps)?,
            qkv: Qkv::load(gguf, index, (d, q, kv))?,
            attention: SelfAttention::new(cfg, None),
            attn_output: load_matmul(gguf, &name("attn_output"), d, q)?,
            ffn_norm: RmsNorm::load(gguf, &name("ffn_norm"), d, cfg.rms_eps)?,
            ffn: GatedFfn::load_fused(gguf, index, (d, ff), Activation::Silu)?,
        })
    }
}

impl Layer for Phi3Layer {
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
