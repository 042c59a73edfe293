//! What the loader understands of a GGUF file, as lists: the metadata keys and the
//! tensors that the compute uses, or that are known not to change what it computes.
//! Anything else in a file (a bias, RoPE scaling by type, a sliding window, experts,
//! a LoRA adapter, one part of a split file) is refused with an error that names it:
//! ignoring it would run the model silently wrong.

use candle_core::quantized::gguf_file::Value;

use super::arch::Architecture;
use super::gguf::GgufFile;
use super::{ModelConfig, ModelError};

/// Per-layer tensors (`blk.N.<name>`) every architecture may have: Q, K and V
/// separate or fused, with or without biases (as llama.cpp reads them for all of
/// these architectures), and the block loader checks that one complete set is there.
const LAYER_TENSORS: &[&str] = &[
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_qkv.weight",
    "attn_q.bias",
    "attn_k.bias",
    "attn_v.bias",
    "attn_qkv.bias",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_up.weight",
    "ffn_down.weight",
];

/// Per-layer tensors only some architectures have.
fn arch_layer_tensors(arch: &'static Architecture) -> impl Iterator<Item = &'static str> {
    let qk_norm = ["attn_q_norm.weight", "attn_k_norm.weight"];
    let gate = ["ffn_gate.weight"];
    let qk_norm = qk_norm.into_iter().filter(move |_| arch.qk_norm);
    qk_norm.chain(gate.into_iter().filter(move |_| !arch.fused_gate_up))
}

/// The client's tensors, and the servers' RoPE frequency factors; `output.weight`
/// (absent when the LM head is tied) and `rope_freqs.weight` are optional.
const MODEL_TENSORS: &[&str] = &[
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
    "rope_freqs.weight",
];

/// `<arch>.` keys the config reads, or that only describe the file.
const ARCH_KEYS: &[&str] = &[
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
    "vocab_size",
];

/// Namespaces that say nothing about the computation: descriptions, quantization
/// provenance (`quantize.imatrix.*`), and the tokenizer, which checks its own keys.
const NEUTRAL_NAMESPACES: &[&str] = &["general.", "quantize.", "tokenizer."];

/// Why a known tensor outside the lists is refused, for the error message.
const KNOWN_TENSORS: &[(&str, &str)] = &[
    (
        ".bias",
        "this bias is not applied (only Q, K and V biases are)",
    ),
    (
        "attn_q_norm",
        "per-head query norms are applied only to qwen3 files",
    ),
    (
        "attn_k_norm",
        "per-head key norms are applied only to qwen3 files",
    ),
    (
        "ffn_gate.",
        "a separate gate in a phi3 file (its gate is fused into ffn_up)",
    ),
    ("_exps", "mixture-of-experts layers are not supported"),
    (
        "rope_factors_",
        "long/short RoPE factors are not supported yet",
    ),
];

/// Refuses `gguf` unless every key and tensor in it is one the loader understands.
pub fn check(gguf: &GgufFile, arch: &str, config: &ModelConfig) -> Result<(), ModelError> {
    let mut keys: Vec<&str> = gguf.metadata_keys().collect();
    keys.sort_unstable();
    for key in keys {
        check_key(gguf, arch, key, config)?;
    }
    let mut tensors: Vec<&str> = gguf.tensor_names().collect();
    tensors.sort_unstable();
    for name in tensors {
        check_tensor(name, config)?;
    }
    Ok(())
}

fn check_key(
    gguf: &GgufFile,
    arch: &str,
    key: &str,
    config: &ModelConfig,
) -> Result<(), ModelError> {
    if NEUTRAL_NAMESPACES.iter().any(|ns| key.starts_with(ns)) {
        return Ok(());
    }
    let value = gguf.metadata(key);
    let refuse = |why: &str| {
        Err(ModelError::NotUnderstood(format!(
            "metadata {key} = {}: {why}",
            show(value)
        )))
    };
    if let Some(field) = key.strip_prefix("split.") {
        return match field {
            "count" if gguf.usize(key).is_ok_and(|n| n <= 1) => Ok(()),
            "count" => refuse(
                "split GGUF files are not supported; merge them with llama-gguf-split --merge",
            ),
            _ => Ok(()),
        };
    }
    let Some(field) = key
        .strip_prefix(arch)
        .and_then(|rest| rest.strip_prefix('.'))
    else {
        return refuse("not a key of a model file this version knows");
    };
    // The scaling factor is read with its type (`config::rope_scaling`), which
    // refuses every type but linear and YaRN.
    if ARCH_KEYS.contains(&field) || config.arch.sliding_window_key == Some(field) {
        return Ok(());
    }
    // Keys that are harmless with their neutral values.
    let neutral = match field {
        "attention.key_length" | "attention.value_length" => {
            gguf.usize(key).is_ok_and(|n| n == config.head_dim)
        }
        "rope.scaling.type" => {
            matches!(value, Some(Value::String(s)) if ["none", "linear", "yarn"].contains(&s.as_str()))
        }
        "expert_count" | "expert_used_count" => gguf.usize(key).is_ok_and(|n| n == 0),
        _ => false,
    };
    match neutral {
        true => Ok(()),
        false => refuse("this version does not compute what it asks for"),
    }
}

fn check_tensor(name: &str, config: &ModelConfig) -> Result<(), ModelError> {
    if MODEL_TENSORS.contains(&name) {
        return Ok(());
    }
    let layer_tensor = name
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(index, rest)| Some((index.parse::<usize>().ok()?, rest)));
    if let Some((index, tensor)) = layer_tensor {
        let known =
            LAYER_TENSORS.contains(&tensor) || arch_layer_tensors(config.arch).any(|t| t == tensor);
        if index < config.block_count && known {
            return Ok(());
        }
    }
    let why = match name {
        "output.bias" => "a bias on the LM head is not applied",
        _ => KNOWN_TENSORS
            .iter()
            .find(|(part, _)| name.contains(part))
            .map_or("this version does not know what it is for", |(_, why)| why),
    };
    Err(ModelError::NotUnderstood(format!("tensor {name}: {why}")))
}

fn show(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => format!("{s:?}"),
        Some(Value::Array(a)) => format!("[{} values]", a.len()),
        Some(Value::F32(x)) => x.to_string(),
        Some(Value::F64(x)) => x.to_string(),
        Some(Value::Bool(x)) => x.to_string(),
        Some(other) => other
            .to_u64()
            .map(|n| n.to_string())
            .or_else(|_| other.to_i64().map(|n| n.to_string()))
            .unwrap_or_else(|_| format!("{other:?}")),
        None => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch;

    fn config(arch: &str) -> ModelConfig {
        ModelConfig {
            arch: arch::find(arch).unwrap(),
            block_count: 30,
            hidden_size: 576,
            feed_forward_size: 1536,
            head_count: 9,
            head_count_kv: 3,
            head_dim: 64,
            rope_dimension: 64,
            rope_freq_base: 10_000.0,
            rope_freq_scale: 1.0,
            rope_yarn: None,
            rms_eps: 1e-5,
            context_length: 2048,
            vocab_size: 49152,
        }
    }

    #[test]
    fn layer_tensors_of_the_layout_pass_and_others_are_named() {
        let llama = config("llama");
        for name in [
            "blk.0.attn_q.weight",
            "blk.29.ffn_down.weight",
            "blk.3.attn_q.bias",
            "blk.3.attn_qkv.weight",
            "blk.3.ffn_gate.weight",
            "output.weight",
            "rope_freqs.weight",
        ] {
            assert!(check_tensor(name, &llama).is_ok(), "{name}");
        }
        for (name, part) in [
            ("blk.30.attn_q.weight", "does not know"),
            ("blk.3.attn_output.bias", "bias is not applied"),
            ("blk.3.ffn_up.bias", "bias is not applied"),
            ("output.bias", "LM head"),
            ("blk.3.attn_k_norm.weight", "key norms"),
            ("blk.3.ffn_up_exps.weight", "mixture-of-experts"),
            ("blk.3.rope_factors_long.weight", "long/short"),
            ("blk.3.attn_q", "does not know"),
        ] {
            let err = check_tensor(name, &llama).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(part), "{name}: {err}");
        }
    }

    #[test]
    fn each_architecture_has_its_own_tensors() {
        assert!(check_tensor("blk.0.attn_q_norm.weight", &config("qwen3")).is_ok());
        assert!(check_tensor("blk.0.attn_k_norm.weight", &config("qwen3")).is_ok());
        assert!(check_tensor("blk.0.attn_q_norm.weight", &config("qwen2")).is_err());
        assert!(check_tensor("blk.0.ffn_gate.weight", &config("qwen2")).is_ok());
        let err = check_tensor("blk.0.ffn_gate.weight", &config("phi3")).unwrap_err();
        assert!(err.to_string().contains("fused into ffn_up"), "{err}");
    }
}
