//! The supported architectures, one file each, as llama.cpp's `src/models/*.cpp`:
//! each owns the metadata keys it reads (with their defaults), the tensors it expects
//! per layer and outside the layers, and its layer's forward built from the shared
//! [`pieces`](super::pieces). The loader refuses every key and tensor outside an
//! architecture's own lists ([`understood`](super::understood)), so adding an
//! architecture is adding a file here and a line to [`ALL`].

mod gemma2;
mod gemma3;
mod llama;
mod phi3;
mod qwen2;
mod qwen3;

use super::gguf::GgufFile;
use super::pieces::Part;
use super::rope::Rope;
use super::{Hidden, ModelConfig, ModelError};

/// Tensors outside the layers that every architecture here may have: the client's
/// embedding, final norm and LM head (`output.weight` is absent when the LM head is
/// tied to the embedding), and the servers' RoPE frequency factors (optional).
pub const GLOBAL_TENSORS: &[&str] = &[
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
    "rope_freqs.weight",
];

/// One architecture: what it reads from a file and how its layers compute.
pub trait Architecture: Send + Sync {
    /// `general.architecture`, also the prefix of its metadata keys.
    fn name(&self) -> &'static str;

    /// The keys under `<name>.` that [`read_config`](Architecture::read_config) reads
    /// or that only describe the file; every other key there is refused.
    fn metadata_keys(&self) -> Vec<&'static str>;

    /// The hyper-parameters, from this architecture's keys.
    fn read_config(&'static self, gguf: &GgufFile) -> Result<ModelConfig, ModelError>;

    /// The tensors of layer N (`blk.N.<name>`) it may read: which must be there, and
    /// their shapes, are checked as a layer loads.
    fn layer_tensors(&self) -> Vec<&'static str>;

    /// The tensors outside the layers it may read.
    fn global_tensors(&self) -> Vec<&'static str> {
        GLOBAL_TENSORS.to_vec()
    }

    /// Layer `index`'s weights, ready to compute.
    fn load_layer(
        &self,
        gguf: &mut GgufFile,
        cfg: &ModelConfig,
        index: usize,
    ) -> Result<Box<dyn Layer>, ModelError>;

    /// What the client multiplies token embeddings by before the first layer, if
    /// anything.
    fn embedding_scale(&self, _cfg: &ModelConfig) -> Option<f32> {
        None
    }

    /// The chat template of files that carry none (`tokenizer.chat_template`), as
    /// llama.cpp falls back to its built-in format for the architecture, if any.
    fn default_chat_template(&self) -> Option<&'static str> {
        None
    }

    /// What the client does to the LM head's logits before sampling (a soft-cap),
    /// if anything.
    fn finish_logits(&self, _cfg: &ModelConfig, _logits: &mut [f32]) {}
}

/// One loaded layer of an architecture.
pub trait Layer: Send + Sync {
    /// `x`: `[batch, tokens, hidden]` (its memory reused for the residual stream), the tokens of one or more sequences one after
    /// another (`parts`, each with its own cache); `layer` indexes this layer's slot in
    /// the caches. Everything but attention runs once over all tokens; attention runs
    /// per part. Each token's result is the same as if its sequence ran alone.
    fn forward(
        &self,
        x: Hidden,
        parts: &mut [Part<'_>],
        layer: usize,
        rope: &Rope,
    ) -> candle_core::Result<Hidden>;
}

impl std::fmt::Debug for dyn Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Architectures are one value each: equal when their names are.
impl PartialEq for dyn Architecture {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

/// Every supported architecture.
pub const ALL: &[&dyn Architecture] = &[
    &llama::Llama,
    &qwen2::Qwen2,
    &qwen3::Qwen3,
    &phi3::Phi3,
    &gemma3::Gemma3,
    &gemma2::Gemma2,
];

/// The architecture named `name` (a file's `general.architecture`), if supported.
pub fn find(name: &str) -> Option<&'static dyn Architecture> {
    ALL.iter().copied().find(|a| a.name() == name)
}

/// The supported names, for error messages.
pub fn names() -> String {
    ALL.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
}
