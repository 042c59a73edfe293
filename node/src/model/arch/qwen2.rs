//! Qwen 2 and 2.5, as llama.cpp's `qwen2`: Llama's layer with RoPE over halves (the
//! checkpoints' own layout, llama.cpp's "neox"), and biases on Q, K and V, which every
//! Qwen 2 file has (the shared Q/K/V piece reads them wherever they are).

use super::llama::{LlamaLayer, Variant};
use super::{Architecture, Layer};
use crate::model::config::{read_llama_style, LLAMA_KEYS};
use crate::model::gguf::GgufFile;
use crate::model::pieces::{ffn, qkv};
use crate::model::rope::RopeStyle;
use crate::model::{ModelConfig, ModelError};

pub struct Qwen2;

impl Architecture for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }

    fn metadata_keys(&self) -> Vec<&'static str> {
        LLAMA_KEYS.to_vec()
    }

    fn read_config(&'static self, gguf: &GgufFile) -> Result<ModelConfig, ModelError> {
        read_llama_style(gguf, self, RopeStyle::Halves)
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
