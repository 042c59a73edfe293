//! Hyper-parameters of a Llama-architecture model, read from GGUF metadata (`llama.*`).

use super::gguf::GgufFile;
use super::ModelError;

/// Architectures whose GGUF tensors follow llama.cpp's `llama` layout.
const LLAMA_LIKE: &[&str] = &["llama"];

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub block_count: usize,
    pub hidden_size: usize,
    pub feed_forward_size: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub head_dim: usize,
    pub rope_dimension: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl LlamaConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let arch = gguf.string("general.architecture")?;
        if !LLAMA_LIKE.contains(&arch) {
            return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = gguf.usize(&key("embedding_length"))?;
        let head_count = gguf.usize(&key("attention.head_count"))?;
        let head_count_kv = match gguf.has(&key("attention.head_count_kv")) {
            true => gguf.usize(&key("attention.head_count_kv"))?,
            false => head_count,
        };
        let head_dim = hidden_size.checked_div(head_count).unwrap_or(0);
        let rope_dimension = match gguf.has(&key("rope.dimension_count")) {
            true => gguf.usize(&key("rope.dimension_count"))?,
            false => head_dim,
        };
        let rope_freq_base = match gguf.has(&key("rope.freq_base")) {
            true => gguf.f32(&key("rope.freq_base"))?,
            false => 10_000.0,
        };
        let vocab_size = gguf
            .tensor_info("token_embd.weight")
            .map(|info| info.shape.dims()[0])
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let config = Self {
            block_count: gguf.usize(&key("block_count"))?,
            hidden_size,
            feed_forward_size: gguf.usize(&key("feed_forward_length"))?,
            head_count,
            head_count_kv,
            head_dim,
            rope_dimension,
            rope_freq_base,
            rms_eps: gguf.f32(&key("attention.layer_norm_rms_epsilon"))?,
            context_length: gguf.usize(&key("context_length"))?,
            vocab_size,
        };
        config.validate()?;
        super::understood::check(gguf, arch, &config)?;
        Ok(config)
    }

    /// Refuses shapes the compute cannot handle, with the reason.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::BadConfig(why));
        if self.block_count == 0 || self.hidden_size == 0 || self.head_count == 0 {
            return bad("block count, embedding length and head count must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.head_count) {
            return bad(format!(
                "embedding length {} is not a multiple of head count {}",
                self.hidden_size, self.head_count
            ));
        }
        if self.head_count_kv == 0 || !self.head_count.is_multiple_of(self.head_count_kv) {
            return bad(format!(
                "head count {} is not a multiple of KV head count {}",
                self.head_count, self.head_count_kv
            ));
        }
        if self.rope_dimension != self.head_dim || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "partial or odd RoPE (dimension {} for head size {}) is not supported",
                self.rope_dimension, self.head_dim
            ));
        }
        if self.context_length == 0 {
            return bad("context length must be positive".into());
        }
        Ok(())
    }

    pub fn kv_size(&self) -> usize {
        self.head_count_kv * self.head_dim
    }
}
