//! What the loader understands of a GGUF file, as lists: the metadata keys and the
//! tensors that the compute uses, or that are known not to change what it computes.
//! Anything else in a file (a bias, RoPE scaling by type, a sliding window, experts,
//! a LoRA adapter, one part of a split file) is refused with an error that names it:
//! ignoring it would run the model silently wrong.

use candle_core::quantized::gguf_file::Value;

use super::gguf::GgufFile;
use super::{LlamaConfig, ModelError};

/// Per-layer tensors (`blk.N.<name>.weight`) of the Llama layout.
pub const LAYER_TENSORS: &[&str] = &[
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

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
    "vocab_size",
];

/// Namespaces that say nothing about the computation: descriptions, quantization
/// provenance (`quantize.imatrix.*`), and the tokenizer, which checks its own keys.
const NEUTRAL_NAMESPACES: &[&str] = &["general.", "quantize.", "tokenizer."];

/// Why a known tensor outside the lists is refused, for the error message.
const KNOWN_TENSORS: &[(&str, &str)] = &[
    (
        "rope_freqs",
        "RoPE frequency factors (llama3 rope scaling) are not applied yet",
    ),
    (".bias", "biases are not applied yet"),
    ("attn_q_norm", "per-head query norms are not applied yet"),
    ("attn_k_norm", "per-head key norms are not applied yet"),
    ("attn_qkv", "fused QKV weights are not supported yet"),
    ("_exps", "mixture-of-experts layers are not supported"),
    (
        "rope_factors_",
        "long/short RoPE factors are not supported yet",
    ),
];

/// Refuses `gguf` unless every key and tensor in it is one the loader understands.
pub fn check(gguf: &GgufFile, arch: &str, config: &LlamaConfig) -> Result<(), ModelError> {
    let mut keys: Vec<&str> = gguf.metadata_keys().collect();
    keys.sort_unstable();
    for key in keys {
        check_key(gguf, arch, key, config)?;
    }
    let mut tensors: Vec<&str> = gguf.tensor_names().collect();
    tensors.sort_unstable();
    for name in tensors {
        check_tensor(name, config.block_count)?;
    }
    Ok(())
}

fn check_key(
    gguf: &GgufFile,
    arch: &str,
    key: &str,
    config: &LlamaConfig,
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
    if ARCH_KEYS.contains(&field) {
        return Ok(());
    }
    // Keys that are harmless with their neutral values.
    let neutral = match field {
        "attention.key_length" | "attention.value_length" => {
            gguf.usize(key).is_ok_and(|n| n == config.head_dim)
        }
        "rope.scaling.type" => matches!(value, Some(Value::String(s)) if s == "none"),
        "rope.scaling.factor" => {
            gguf.f32(key).is_ok_and(|f| f == 1.0 || f == 0.0) || scaling_is_none(gguf, arch)
        }
        "rope.scaling.original_context_length" | "rope.scaling.finetuned" => {
            scaling_is_none(gguf, arch) || !gguf.has(&format!("{arch}.rope.scaling.type"))
        }
        "expert_count" | "expert_used_count" => gguf.usize(key).is_ok_and(|n| n == 0),
        _ => false,
    };
    match neutral {
        true => Ok(()),
        false => refuse("this version does not compute what it asks for"),
    }
}

fn scaling_is_none(gguf: &GgufFile, arch: &str) -> bool {
    matches!(gguf.metadata(&format!("{arch}.rope.scaling.type")), Some(Value::String(s)) if s == "none")
}

fn check_tensor(name: &str, block_count: usize) -> Result<(), ModelError> {
    if MODEL_TENSORS.contains(&name) {
        return Ok(());
    }
    let layer_tensor = name
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(index, rest)| {
            Some((index.parse::<usize>().ok()?, rest.strip_suffix(".weight")?))
        });
    if let Some((index, tensor)) = layer_tensor {
        if index < block_count && LAYER_TENSORS.contains(&tensor) {
            return Ok(());
        }
    }
    let why = KNOWN_TENSORS
        .iter()
        .find(|(part, _)| name.contains(part))
        .map_or("this version does not know what it is for", |(_, why)| why);
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

    #[test]
    fn layer_tensors_of_the_layout_pass_and_others_are_named() {
        assert!(check_tensor("blk.0.attn_q.weight", 30).is_ok());
        assert!(check_tensor("blk.29.ffn_down.weight", 30).is_ok());
        assert!(check_tensor("output.weight", 30).is_ok());
        assert!(check_tensor("rope_freqs.weight", 30).is_ok());
        for (name, part) in [
            ("blk.30.attn_q.weight", "does not know"),
            ("blk.3.attn_q.bias", "biases"),
            ("blk.3.attn_k_norm.weight", "key norms"),
            ("blk.3.attn_qkv.weight", "fused QKV"),
            ("blk.3.ffn_up_exps.weight", "mixture-of-experts"),
            ("blk.3.attn_q", "does not know"),
        ] {
            let err = check_tensor(name, 30).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(part), "{name}: {err}");
        }
    }
}
