//! Qwen 3 (dense), as llama.cpp's `qwen3`: Llama's layer with per-head RMS norms of
//! queries and keys before RoPE, RoPE over halves, and a head size of its own
//! (`attention.key_length`), not width / heads.

use super::llama::{LlamaLayer, Variant};
use super::{Architecture, Layer};
use crate::model::config::{read_llama_style, LLAMA_KEYS};
use crate::model::gguf::GgufFile;
use crate::model::pieces::{ffn, qkv};
use crate::model::rope::RopeStyle;
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
        Ok(Box::new(LlamaLayer::load(
            gguf,
            cfg,
            index,
            Variant {
                head_norms: true,
                fused_gate_up: false,
            },
        )?))
    }
}
