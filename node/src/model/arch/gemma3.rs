//! Gemma 3 (text), as llama.cpp's `gemma3`: embeddings scaled by √width (on the
//! client), per-head RMS norms of queries and keys, RMS norms after attention and
//! after the feed-forward as well as before, a GELU-gated feed-forward, RoPE over
//! halves, an optional final logit soft-cap, and sliding-window attention on most
//! layers: local layers see the last `attention.sliding_window` positions and turn
//! with their own RoPE base (`rope.freq_base_swa`, else 10,000, never scaled), global
//! layers see the whole session with `rope.freq_base` and the file's linear scaling.
//! The file's norm weights already hold Gemma's `1 + w`.

use candle_core::quantized::gguf_file::Value;

use super::{Architecture, Layer};
use crate::model::config::{read_llama_style, SlidingWindow, LLAMA_KEYS};
use crate::model::gguf::GgufFile;
use crate::model::kernels::Linear;
use crate::model::pieces::ffn::{Activation, GatedFfn, SEPARATE_TENSORS};
use crate::model::pieces::load::load_matmul;
use crate::model::pieces::norm::{HeadNorms, RmsNorm};
use crate::model::pieces::qkv::Qkv;
use crate::model::pieces::self_attention::SelfAttention;
use crate::model::pieces::Part;
use crate::model::rope::{Rope, RopeSpec, RopeStyle};
use crate::model::{Hidden, ModelConfig, ModelError};

pub struct Gemma3;

/// Keys Gemma 2 reads too.
pub(super) const SLIDING_WINDOW: &str = "attention.sliding_window";
pub(super) const SLIDING_WINDOW_PATTERN: &str = "attention.sliding_window_pattern";
pub(super) const FREQ_BASE_SWA: &str = "rope.freq_base_swa";
pub(super) const FINAL_SOFTCAP: &str = "final_logit_softcapping";

/// llama.cpp's default pattern: five local layers, then one global.
const DEFAULT_PATTERN: usize = 6;
/// llama.cpp's RoPE base of local layers when the file names none.
const DEFAULT_FREQ_BASE_SWA: f32 = 10_000.0;
/// The layer count of Gemma 3 27B, whose attention scale comes from width / heads
/// (llama.cpp recognises the model by it).
const LAYERS_27B: usize = 62;

impl Architecture for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }

    fn metadata_keys(&self) -> Vec<&'static str> {
        let own = [
            SLIDING_WINDOW,
            SLIDING_WINDOW_PATTERN,
            FREQ_BASE_SWA,
            FINAL_SOFTCAP,
        ];
        [LLAMA_KEYS, &own[..]].concat()
    }

    fn read_config(&'static self, gguf: &GgufFile) -> Result<ModelConfig, ModelError> {
        let mut config = read_gemma_style(gguf, self, LAYERS_27B)?;
        let key = |k: &str| format!("gemma3.{k}");
        let window = match gguf.has(&key(SLIDING_WINDOW)) {
            true => gguf.usize(&key(SLIDING_WINDOW))?,
            false => 0,
        };
        if window > 0 {
            let pattern = key(SLIDING_WINDOW_PATTERN);
            let local = local_layers(gguf, &pattern, config.block_count, DEFAULT_PATTERN)?;
            let freq_base = match gguf.has(&key(FREQ_BASE_SWA)) {
                true => gguf.f32(&key(FREQ_BASE_SWA))?,
                false => DEFAULT_FREQ_BASE_SWA,
            };
            config.rope_local = Some(RopeSpec {
                freq_base,
                freq_scale: 1.0,
                yarn: None,
                ..config.rope()
            });
            config.sliding_window = Some(SlidingWindow { window, local });
        }
        // llama.cpp caps only with a cap other than 0.
        config.final_logit_softcap = read_cap(gguf, &key(FINAL_SOFTCAP))?.filter(|&c| c != 0.0);
        Ok(config)
    }

    fn layer_tensors(&self) -> Vec<&'static str> {
        let own = [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "attn_output.weight",
            "post_attention_norm.weight",
            "ffn_norm.weight",
            "post_ffw_norm.weight",
        ];
        [&own[..], SEPARATE_TENSORS].concat()
    }

    fn global_tensors(&self) -> Vec<&'static str> {
        vec!["token_embd.weight", "output_norm.weight", "output.weight"]
    }

    fn load_layer(
        &self,
        gguf: &mut GgufFile,
        cfg: &ModelConfig,
        index: usize,
    ) -> Result<Box<dyn Layer>, ModelError> {
        Ok(Box::new(Gemma3Layer::load(gguf, cfg, index, true)?))
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

/// The hyper-parameters Gemma 2 and 3 read alike: llama's, with RoPE over halves and
/// only linear RoPE scaling, and the attention scale of width / heads in the 27B
/// model, which llama.cpp recognises by its layer count (`layers_27b`).
pub(super) fn read_gemma_style(
    gguf: &GgufFile,
    arch: &'static dyn Architecture,
    layers_27b: usize,
) -> Result<ModelConfig, ModelError> {
    let mut config = read_llama_style(gguf, arch, RopeStyle::Halves)?;
    if config.rope_yarn.is_some() {
        return Err(ModelError::NotUnderstood(format!(
            "metadata {}.rope.scaling.type = yarn: a {0} file's RoPE scaling is linear",
            arch.name()
        )));
    }
    if config.block_count == layers_27b {
        // Integer division first, as llama.cpp divides its integers.
        let per_head = config.hidden_size / config.head_count;
        config.attention_scale = Some(1.0 / (per_head as f32).sqrt());
    }
    Ok(config)
}

/// A soft-cap from metadata `key`, if the file has one: a number, not negative.
pub(super) fn read_cap(gguf: &GgufFile, key: &str) -> Result<Option<f32>, ModelError> {
    if !gguf.has(key) {
        return Ok(None);
    }
    let cap = gguf.f32(key)?;
    if !cap.is_finite() || cap < 0.0 {
        return Err(ModelError::BadMetadata(
            key.to_string(),
            "a positive number",
        ));
    }
    Ok(Some(cap))
}

/// The final logit soft-cap, where the model has one.
pub(super) fn softcap_logits(cfg: &ModelConfig, logits: &mut [f32]) {
    if let Some(cap) = cfg.final_logit_softcap {
        // As ggml: a product by the f32 reciprocal, not a division.
        let inverse = 1.0 / cap;
        for x in logits {
            *x = cap * libm::tanhf(*x * inverse);
        }
    }
}

/// llama.cpp's built-in `gemma` chat format, for Gemma files without a template of
/// their own (base models): system messages trimmed and merged into the next user
/// turn, `assistant` called `model`, every content trimmed.
pub(super) const GEMMA_TEMPLATE: &str = "{%- set ns = namespace(system='') -%}\
{%- for message in messages -%}\
{%- if message['role'] == 'system' -%}\
{%- set ns.system = ns.system + (message['content'] | trim) -%}\
{%- else -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{- '<start_of_turn>' + role + '\n' -}}\
{%- if ns.system != '' and role != 'model' -%}\
{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}\
{%- endif -%}\
{{- (message['content'] | trim) + '<end_of_turn>\n' -}}\
{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}";

/// Which of `layers` layers are local: from the pattern key, a per-layer array (true
/// or 1 for local) or a period `n` (layer `i` is local unless `i % n == n - 1`; 0
/// makes every layer local), by default the period `default`.
pub(super) fn local_layers(
    gguf: &GgufFile,
    key: &str,
    layers: usize,
    default: usize,
) -> Result<Vec<bool>, ModelError> {
    let bad = || ModelError::BadMetadata(key.to_string(), "a number or one flag per layer");
    let period = match gguf.metadata(key) {
        None => default,
        Some(Value::Array(flags)) => {
            if flags.len() != layers {
                return Err(bad());
            }
            return flags
                .iter()
                .map(|flag| match flag {
                    Value::Bool(b) => Ok(*b),
                    other => other.to_u64().map(|n| n != 0).map_err(|_| bad()),
                })
                .collect();
        }
        Some(_) => gguf.usize(key)?,
    };
    Ok((0..layers)
        .map(|i| period == 0 || i % period < period - 1)
        .collect())
}

/// Gemma 3's layer; without the per-head norms, Gemma 2's.
pub(super) struct Gemma3Layer {
    attn_norm: RmsNorm,
    qkv: Qkv,
    /// With the per-head norms where the model has them, and a window on local layers.
    attention: SelfAttention,
    /// Whether this layer turns with the local layers' RoPE.
    local: bool,
    attn_output: Linear,
    post_attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
    ffn: GatedFfn,
    post_ffw_norm: RmsNorm,
}

impl Gemma3Layer {
    pub(super) fn load(
        gguf: &mut GgufFile,
        cfg: &ModelConfig,
        index: usize,
        head_norms: bool,
    ) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        let (d, q, kv, ff, eps) = (
            cfg.hidden_size,
            cfg.q_size(),
            cfg.kv_size(),
            cfg.feed_forward_size,
            cfg.rms_eps,
        );
        let head_norms = match head_norms {
            true => Some(HeadNorms::load(gguf, index, cfg.head_dim, eps)?),
            false => None,
        };
        let mut attention = SelfAttention::new(cfg, head_norms);
        let window = cfg.sliding_window.as_ref().filter(|w| w.is_local(index));
        if let Some(w) = window {
            attention = attention.windowed(w.window);
        }
        Ok(Self {
            attn_norm: RmsNorm::load(gguf, &name("attn_norm"), d, eps)?,
            qkv: Qkv::load(gguf, index, (d, q, kv))?,
            attention,
            local: window.is_some(),
            attn_output: load_matmul(gguf, &name("attn_output"), d, q)?,
            post_attention_norm: RmsNorm::load(gguf, &name("post_attention_norm"), d, eps)?,
            ffn_norm: RmsNorm::load(gguf, &name("ffn_norm"), d, eps)?,
            ffn: GatedFfn::load_separate(gguf, index, (d, ff), Activation::Gelu)?,
            post_ffw_norm: RmsNorm::load(gguf, &name("post_ffw_norm"), d, eps)?,
        })
    }
}

impl Layer for Gemma3Layer {
    fn forward(
        &self,
        x: Hidden,
        parts: &mut [Part<'_>],
        layer: usize,
        rope: &Rope,
    ) -> candle_core::Result<Hidden> {
        let _span = tracing::trace_span!("block", layer).entered();
        let rope = if self.local { rope.local() } else { rope };
        let qkv = self.qkv.forward(&self.attn_norm.forward(&x)?)?;
        let attended = self.attention.forward(&qkv, parts, layer, rope)?;
        let attended = self
            .post_attention_norm
            .forward(&self.attn_output.apply(&attended)?)?;
        let (h, normed) = self.ffn_norm.add_forward(&attended, x)?;
        let mut fed = self.post_ffw_norm.forward(&self.ffn.forward(&normed)?)?;
        fed.add(&h)?;
        Ok(fed)
    }
}
