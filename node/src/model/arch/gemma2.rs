//! Gemma 2, as llama.cpp's `gemma2`: Gemma 3's layer without the per-head norms of
//! queries and keys (embeddings scaled by √width on the client, RMS norms after
//! attention and after the feed-forward as well as before, a GELU-gated feed-forward,
//! RoPE over halves), with attention scores soft-capped before the softmax
//! (`attn_logit_softcapping`) and the LM head's logits too (`final_logit_softcapping`),
//! llama.cpp's defaults where the file names none. Local and global layers alternate,
//! the first local (`attention.sliding_window_pattern` may say otherwise); local layers
//! see the last `attention.sliding_window` positions and turn like the global ones
//! unless the file gives them a base of their own (`rope.freq_base_swa`).

use super::gemma3::{
    local_layers, read_cap, read_gemma_style, softcap_logits, Gemma3Layer, FINAL_SOFTCAP,
    FREQ_BASE_SWA, GEMMA_TEMPLATE, SLIDING_WINDOW, SLIDING_WINDOW_PATTERN,
};
use super::{Architecture, Layer};
use crate::model::config::{SlidingWindow, LLAMA_KEYS};
use crate::model::gguf::GgufFile;
use crate::model::pieces::ffn::SEPARATE_TENSORS;
use crate::model::rope::RopeSpec;
use crate::model::{ModelConfig, ModelError};

pub struct Gemma2;

const ATTENTION_SOFTCAP: &str = "attn_logit_softcapping";

/// llama.cpp's defaults for files without the keys.
const DEFAULT_WINDOW: usize = 4096;
const DEFAULT_PATTERN: usize = 2;
const DEFAULT_ATTENTION_SOFTCAP: f32 = 50.0;
const DEFAULT_FINAL_SOFTCAP: f32 = 30.0;
/// The layer count of Gemma 2 27B, whose attention scale comes from width / heads.
const LAYERS_27B: usize = 46;

impl Architecture for Gemma2 {
    fn name(&self) -> &'static str {
        "gemma2"
    }

    fn metadata_keys(&self) -> Vec<&'static str> {
        let own = [
            SLIDING_WINDOW,
            SLIDING_WINDOW_PATTERN,
            FREQ_BASE_SWA,
            ATTENTION_SOFTCAP,
            FINAL_SOFTCAP,
        ];
        [LLAMA_KEYS, &own[..]].concat()
    }

    fn read_config(&'static self, gguf: &GgufFile) -> Result<ModelConfig, ModelError> {
        let mut config = read_gemma_style(gguf, self, LAYERS_27B)?;
        let key = |k: &str| format!("gemma2.{k}");
        let window = match gguf.has(&key(SLIDING_WINDOW)) {
            true => gguf.usize(&key(SLIDING_WINDOW))?,
            false => DEFAULT_WINDOW,
        };
        // llama.cpp masks every position with a window of 0.
        if window == 0 {
            return Err(ModelError::BadMetadata(
                key(SLIDING_WINDOW),
                "a positive number",
            ));
        }
        let pattern = key(SLIDING_WINDOW_PATTERN);
        let local = local_layers(gguf, &pattern, config.block_count, DEFAULT_PATTERN)?;
        config.sliding_window = Some(SlidingWindow { window, local });
        if gguf.has(&key(FREQ_BASE_SWA)) {
            config.rope_local = Some(RopeSpec {
                freq_base: gguf.f32(&key(FREQ_BASE_SWA))?,
                ..config.rope()
            });
        }
        // Both caps always apply: llama.cpp divides by them, so 0 is no model's cap.
        let cap = |name: &str, default: f32| match read_cap(gguf, &key(name))? {
            Some(0.0) => Err(ModelError::BadMetadata(key(name), "a positive number")),
            cap => Ok(Some(cap.unwrap_or(default))),
        };
        config.attention_logit_softcap = cap(ATTENTION_SOFTCAP, DEFAULT_ATTENTION_SOFTCAP)?;
        config.final_logit_softcap = cap(FINAL_SOFTCAP, DEFAULT_FINAL_SOFTCAP)?;
        Ok(config)
    }

    fn layer_tensors(&self) -> Vec<&'static str> {
        let own = [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "post_attention_norm.weight",
            "ffn_norm.weight",
            "post_ffw_norm.weight",
        ];
        [&own[..], SEPARATE_TENSORS].concat()
    }

    /// The LM head is always the embedding: llama.cpp refuses a file with its own.
    fn global_tensors(&self) -> Vec<&'static str> {
        vec!["token_embd.weight", "output_norm.weight"]
    }

    fn load_layer(
        &self,
        gguf: &mut GgufFile,
        cfg: &ModelConfig,
        index: usize,
    ) -> Result<Box<dyn Layer>, ModelError> {
        Ok(Box::new(Gemma3Layer::load(gguf, cfg, index, false)?))
    }

    fn embedding_scale(&self, cfg: &ModelConfig) -> Option<f32> {
        Some((cfg.hidden_size as f32).sqrt())
    }

    fn default_chat_template(&self) -> Option<&'static str> {
        Some(GEMMA_TEMPLATE)
    }

    fn finish_logits(&self, cfg: &ModelConfig, logits: &mut [f32]) {
        softcap_logits(cfg, logits);
    }
}
