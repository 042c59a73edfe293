//! Phi-3 (mini and medium, 4k context), as llama.cpp's `phi3`: Llama's layer with Q, K
//! and V fused into one `attn_qkv`, gate and up fused into one `ffn_up`, RoPE over
//! halves, and a sliding window. The 128k variants' long/short RoPE factors are not
//! among its tensors, so they are refused.

use super::llama::{LlamaLayer, Variant};
use super::{Architecture, Layer};
use crate::model::config::{read_llama_style, LLAMA_KEYS};
use crate::model::gguf::GgufFile;
use crate::model::pieces::{ffn, qkv};
use crate::model::rope::RopeStyle;
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
        Ok(Box::new(LlamaLayer::load(
            gguf,
            cfg,
            index,
            Variant {
                head_norms: false,
                fused_gate_up: true,
            },
        )?))
    }
}
