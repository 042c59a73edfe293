//! Hyper-parameters of a model, read from GGUF metadata (`<architecture>.*`) by its
//! architecture, and the bounds every architecture's must keep. The keys these
//! families share with llama.cpp's `llama` are read here, for an architecture to
//! call and add its own to.

use candle_core::quantized::gguf_file::Value;

use super::arch::{self, Architecture};
use super::gguf::GgufFile;
use super::rope::{RopeSpec, RopeStyle, Yarn};
use super::ModelError;

// Bounds on what a file may declare: each well past the largest open models (126
// blocks, width 16384, feed-forward 53248, 128 heads of up to 256, 262144 tokens),
// and small enough that the products computed from them (weights per layer, KV
// sizes, cache lengths) fit in 64 bits with room to spare.
const MAX_BLOCKS: usize = 4096;
const MAX_WIDTH: usize = 1 << 17;
const MAX_FEED_FORWARD: usize = 1 << 20;
const MAX_HEADS: usize = 1024;
const MAX_HEAD_SIZE: usize = 4096;
const MAX_VOCAB: usize = 1 << 24;
/// The RoPE tables are built for every position when a shard loads, so a context
/// length is memory before any token is computed: 2^20 positions (eight times
/// Llama 3's context) with 128-wide heads is 512 MiB of tables. A longer context
/// would need tables built as positions are reached.
const MAX_CONTEXT: usize = 1 << 20;
/// Heads wider than 256 with the longest contexts would pass the bounds above but
/// still ask for gigabytes of tables.
const MAX_ROPE_TABLE_BYTES: u64 = 1 << 30;

/// The `<architecture>.` keys [`read_llama_style`] reads, or that only describe the
/// file: what every architecture here shares with llama.cpp's `llama`.
pub const LLAMA_KEYS: &[&str] = &[
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
    "vocab_size",
];

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: &'static dyn Architecture,
    pub block_count: usize,
    pub hidden_size: usize,
    pub feed_forward_size: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub head_dim: usize,
    pub rope_dimension: usize,
    pub rope_style: RopeStyle,
    pub rope_freq_base: f32,
    /// RoPE scaling's `1 / factor` (linear or YaRN); 1 without.
    pub rope_freq_scale: f32,
    pub rope_yarn: Option<Yarn>,
    pub rms_eps: f32,
    /// The model's context length, or its sliding window where that is shorter.
    pub context_length: usize,
    pub vocab_size: usize,
    /// The RoPE of sliding-window layers where it differs from `rope()` (Gemma 3).
    pub rope_local: Option<RopeSpec>,
    /// Sliding-window attention: the window, and which layers are local (one flag
    /// per layer); `None` where every layer attends to the whole session.
    pub sliding_window: Option<SlidingWindow>,
    /// What attention scores are multiplied by, where it is not `1 / sqrt(head_dim)`.
    pub attention_scale: Option<f32>,
    /// `cap × tanh(score / cap)` on the scaled attention scores, before the softmax,
    /// where the model caps them (Gemma 2).
    pub attention_logit_softcap: Option<f32>,
    /// `cap × tanh(logit / cap)` on the LM head's logits, where the model caps them.
    pub final_logit_softcap: Option<f32>,
}

/// Which layers attend to a window of the last `window` positions only.
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    pub window: usize,
    pub local: Vec<bool>,
}

impl SlidingWindow {
    /// Whether layer `index` is a sliding-window one.
    pub fn is_local(&self, index: usize) -> bool {
        self.local.get(index).copied().unwrap_or(false)
    }
}

impl ModelConfig {
    /// The hyper-parameters of the file's architecture, checked, after refusing the
    /// file if it holds anything that architecture does not understand.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let name = gguf.string("general.architecture")?;
        let arch = arch::find(name).ok_or_else(|| ModelError::UnsupportedArchitecture {
            name: name.to_string(),
        })?;
        let config = arch.read_config(gguf)?;
        config.validate()?;
        super::understood::check(gguf, &config)?;
        Ok(config)
    }

    /// Refuses shapes the compute cannot handle, with the reason; and sizes past any
    /// model's, so that no size computed from them overflows or asks for memory a
    /// real model of that shape would not need.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::BadConfig(why));
        let bounds = [
            ("block_count", self.block_count, MAX_BLOCKS),
            ("embedding_length", self.hidden_size, MAX_WIDTH),
            (
                "feed_forward_length",
                self.feed_forward_size,
                MAX_FEED_FORWARD,
            ),
            ("attention.head_count", self.head_count, MAX_HEADS),
            ("attention.head_count_kv", self.head_count_kv, MAX_HEADS),
            (
                "attention.key_length (head size)",
                self.head_dim,
                MAX_HEAD_SIZE,
            ),
            ("context_length", self.context_length, MAX_CONTEXT),
            (
                "vocabulary (token_embd.weight rows)",
                self.vocab_size,
                MAX_VOCAB,
            ),
        ];
        for (key, value, max) in bounds {
            if value > max {
                return bad(format!(
                    "{}.{key} is {value}, more than this version's limit of {max}",
                    self.arch.name()
                ));
            }
        }
        if self.block_count == 0 || self.hidden_size == 0 || self.head_count == 0 {
            return bad("block count, embedding length and head count must be positive".into());
        }
        if self.head_dim == 0 {
            return bad("head size must be positive".into());
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
        // The RoPE tables hold a cosine and a sine per position and half head.
        let rope_bytes = self.context_length as u64 * self.head_dim as u64 * 4;
        if rope_bytes > MAX_ROPE_TABLE_BYTES {
            return bad(format!(
                "context length {} with head size {} needs {rope_bytes} bytes of RoPE \
                 tables, more than this version's limit of {MAX_ROPE_TABLE_BYTES}",
                self.context_length, self.head_dim
            ));
        }
        Ok(())
    }

    /// Within the bounds `validate` holds, this product cannot overflow.
    pub fn kv_size(&self) -> usize {
        self.head_count_kv * self.head_dim
    }

    /// The width of all query heads together (the hidden size, except in Qwen 3).
    /// Within the bounds `validate` holds, this product cannot overflow.
    pub fn q_size(&self) -> usize {
        self.head_count * self.head_dim
    }

    pub fn rope(&self) -> RopeSpec {
        RopeSpec {
            head_dim: self.head_dim,
            freq_base: self.rope_freq_base,
            freq_scale: self.rope_freq_scale,
            yarn: self.rope_yarn,
            style: self.rope_style,
        }
    }
}

/// The hyper-parameters from [`LLAMA_KEYS`], with llama.cpp's defaults: KV heads as
/// many as query heads, heads of width / heads unless `attention.key_length` says
/// otherwise (Qwen 3 sizes its heads apart from the width), RoPE over the whole head
/// with base 10,000.
pub fn read_llama_style(
    gguf: &GgufFile,
    arch: &'static dyn Architecture,
    rope_style: RopeStyle,
) -> Result<ModelConfig, ModelError> {
    let name = arch.name();
    let key = |k: &str| format!("{name}.{k}");
    let hidden_size = gguf.usize(&key("embedding_length"))?;
    let head_count = gguf.usize(&key("attention.head_count"))?;
    let head_count_kv = match gguf.has(&key("attention.head_count_kv")) {
        true => gguf.usize(&key("attention.head_count_kv"))?,
        false => head_count,
    };
    let head_dim = match gguf.has(&key("attention.key_length")) {
        true => gguf.usize(&key("attention.key_length"))?,
        false => hidden_size.checked_div(head_count).unwrap_or(0),
    };
    if gguf.has(&key("attention.value_length"))
        && gguf.usize(&key("attention.value_length"))? != head_dim
    {
        return Err(ModelError::BadConfig(format!(
            "value heads of another size than key heads ({}) are not supported",
            head_dim
        )));
    }
    let rope_dimension = match gguf.has(&key("rope.dimension_count")) {
        true => gguf.usize(&key("rope.dimension_count"))?,
        false => head_dim,
    };
    let rope_freq_base = match gguf.has(&key("rope.freq_base")) {
        true => gguf.f32(&key("rope.freq_base"))?,
        false => 10_000.0,
    };
    let context_length = gguf.usize(&key("context_length"))?;
    let (rope_freq_scale, rope_yarn) =
        rope_scaling(gguf, name, head_dim, rope_freq_base, context_length)?;
    let vocab_size = vocab_size(gguf)?;
    Ok(ModelConfig {
        arch,
        block_count: gguf.usize(&key("block_count"))?,
        hidden_size,
        feed_forward_size: gguf.usize(&key("feed_forward_length"))?,
        head_count,
        head_count_kv,
        head_dim,
        rope_dimension,
        rope_style,
        rope_freq_base,
        rope_freq_scale,
        rope_yarn,
        rms_eps: gguf.f32(&key("attention.layer_norm_rms_epsilon"))?,
        context_length,
        vocab_size,
        rope_local: None,
        sliding_window: None,
        attention_scale: None,
        attention_logit_softcap: None,
        final_logit_softcap: None,
    })
}

/// The vocabulary's size: the embedding's rows.
fn vocab_size(gguf: &GgufFile) -> Result<usize, ModelError> {
    let embeddings = gguf
        .tensor_info("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
    match embeddings.shape[..] {
        [vocab, _] => Ok(vocab),
        ref dims => Err(ModelError::BadConfig(format!(
            "tensor token_embd.weight has shape {dims:?}, not one row per token"
        ))),
    }
}

/// RoPE scaling: `1 / factor`, and YaRN's parameters where its type is `yarn`. As
/// in llama.cpp, a factor (`rope.scaling.factor`, or the older `rope.scale_linear`)
/// scales linearly when `rope.scaling.type` is absent or `linear`; `yarn` takes its
/// original context from `rope.scaling.original_context_length`, else the context
/// length; with any other type a factor other than 1 is refused, since this version
/// computes no other scaling.
fn rope_scaling(
    gguf: &GgufFile,
    arch: &str,
    head_dim: usize,
    freq_base: f32,
    context: usize,
) -> Result<(f32, Option<Yarn>), ModelError> {
    let kind_key = format!("{arch}.rope.scaling.type");
    let kind = match gguf.metadata(&kind_key) {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(ModelError::BadMetadata(kind_key, "a string")),
        None => "linear",
    };
    let factor_key = [
        format!("{arch}.rope.scaling.factor"),
        format!("{arch}.rope.scale_linear"),
    ]
    .into_iter()
    .find(|k| gguf.has(k));
    let Some(factor_key) = factor_key else {
        return Ok((1.0, None));
    };
    let factor = gguf.f32(&factor_key)?;
    match kind {
        _ if factor == 0.0 || factor == 1.0 => Ok((1.0, None)),
        "linear" | "yarn" if !(factor.is_finite() && factor > 0.0) => {
            Err(ModelError::BadMetadata(factor_key, "a positive number"))
        }
        "linear" => Ok((1.0 / factor, None)),
        "yarn" => {
            let original_key = format!("{arch}.rope.scaling.original_context_length");
            let original = match gguf.has(&original_key) {
                true => gguf.usize(&original_key)?,
                false => context,
            };
            if original == 0 {
                return Err(ModelError::BadMetadata(original_key, "a positive number"));
            }
            let yarn = Yarn::new(head_dim, freq_base, factor, original);
            Ok((1.0 / factor, Some(yarn)))
        }
        _ => Err(ModelError::NotUnderstood(format!(
            "metadata {factor_key} = {factor} with {kind_key} = {kind:?}: \
             only linear and YaRN RoPE scaling are computed by this version"
        ))),
    }
}
