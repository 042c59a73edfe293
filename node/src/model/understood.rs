//! What the loader understands of a GGUF file: the metadata keys and tensors its
//! architecture lists ([`Architecture`]), and keys known not to change what it
//! computes. Anything else in a file (a bias, RoPE scaling by type, a sliding window,
//! experts, a LoRA adapter, one part of a split file) is refused with an error that
//! names it and the architecture's own list: ignoring it would run the model silently
//! wrong.

use candle_core::quantized::gguf_file::Value;

use super::arch::{self, Architecture};
use super::gguf::GgufFile;
use super::{ModelConfig, ModelError};

/// Namespaces that say nothing about the computation: descriptions, quantization
/// provenance (`quantize.imatrix.*`), and the tokenizer, which checks its own keys.
const NEUTRAL_NAMESPACES: &[&str] = &["general.", "quantize.", "tokenizer."];

/// What a tensor outside every architecture's lists is, where that is known, for the
/// error message.
const KNOWN_TENSORS: &[(&str, &str)] = &[
    (".bias", "this bias is not applied"),
    ("_exps", "mixture-of-experts layers are not supported"),
    (
        "rope_factors_",
        "long/short RoPE factors are not supported yet",
    ),
];

/// Refuses `gguf` unless every key and tensor in it is one its architecture lists.
pub fn check(gguf: &GgufFile, config: &ModelConfig) -> Result<(), ModelError> {
    let arch = config.arch;
    let mut keys: Vec<&str> = gguf.metadata_keys().collect();
    keys.sort_unstable();
    let arch_keys = arch.metadata_keys();
    for key in keys {
        check_key(gguf, key, &arch_keys, config)?;
    }
    let mut tensors: Vec<&str> = gguf.tensor_names().collect();
    tensors.sort_unstable();
    let lists = TensorLists::of(arch);
    for name in tensors {
        check_tensor(name, &lists, config)?;
    }
    Ok(())
}

fn check_key(
    gguf: &GgufFile,
    key: &str,
    arch_keys: &[&str],
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
    let name = config.arch.name();
    let Some(field) = key
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('.'))
    else {
        return refuse("not a key of a model file this version knows");
    };
    // The scaling factor is read with its type (`config::rope_scaling`), which
    // refuses every type but linear and YaRN.
    if arch_keys.contains(&field) {
        return Ok(());
    }
    // Keys that are harmless with their neutral values, in any architecture.
    let neutral = match field {
        "rope.scaling.type" => {
            matches!(value, Some(Value::String(s)) if ["none", "linear", "yarn"].contains(&s.as_str()))
        }
        "expert_count" | "expert_used_count" => gguf.usize(key).is_ok_and(|n| n == 0),
        _ => false,
    };
    if neutral {
        return Ok(());
    }
    let others = others_with(config.arch, |a| a.metadata_keys().contains(&field));
    refuse(&format!(
        "this version does not compute what it asks for in a {name} file{others}; \
         a {name} file's keys are {}",
        arch_keys.join(", ")
    ))
}

/// An architecture's tensors, in its layers and outside them.
struct TensorLists {
    layer: Vec<&'static str>,
    global: Vec<&'static str>,
}

impl TensorLists {
    fn of(arch: &dyn Architecture) -> Self {
        Self {
            layer: arch.layer_tensors(),
            global: arch.global_tensors(),
        }
    }
}

fn check_tensor(name: &str, lists: &TensorLists, config: &ModelConfig) -> Result<(), ModelError> {
    if lists.global.contains(&name) {
        return Ok(());
    }
    let layer_tensor = name
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(index, rest)| Some((index.parse::<usize>().ok()?, rest)));
    let arch = config.arch.name();
    let refuse = |why: String| Err(ModelError::NotUnderstood(format!("tensor {name}: {why}")));
    let (others, whose, list) = match layer_tensor {
        Some((index, tensor)) if lists.layer.contains(&tensor) => {
            return match index < config.block_count {
                true => Ok(()),
                false => refuse(format!(
                    "this version does not know what it is for: the model has {} layers",
                    config.block_count
                )),
            };
        }
        Some((_, tensor)) => (
            others_with(config.arch, |a| a.layer_tensors().contains(&tensor)),
            "layer",
            &lists.layer,
        ),
        None => (
            others_with(config.arch, |a| a.global_tensors().contains(&name)),
            "model outside its layers",
            &lists.global,
        ),
    };
    let known = match name {
        "output.bias" => Some("a bias on the LM head is not applied"),
        _ => KNOWN_TENSORS
            .iter()
            .find(|(part, _)| name.contains(part))
            .map(|(_, why)| *why),
    };
    let why = match (others.is_empty(), known) {
        (false, _) => format!("{arch} files do not have it{others}"),
        (true, Some(why)) => why.to_string(),
        (true, None) => "this version does not know what it is for".into(),
    };
    refuse(format!(
        "{why}; the tensors of a {arch} {whose} are {}",
        list.join(", ")
    ))
}

/// ` (only <names> files do)` for the other architectures where `has` holds, or nothing.
fn others_with(arch: &dyn Architecture, has: impl Fn(&dyn Architecture) -> bool) -> String {
    let others: Vec<&str> = arch::ALL
        .iter()
        .filter(|a| a.name() != arch.name() && has(**a))
        .map(|a| a.name())
        .collect();
    match others.is_empty() {
        true => String::new(),
        false => format!(" (only {} files do)", others.join(", ")),
    }
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
            rope_style: crate::model::rope::RopeStyle::Adjacent,
            rope_freq_base: 10_000.0,
            rope_freq_scale: 1.0,
            rope_yarn: None,
            rms_eps: 1e-5,
            context_length: 2048,
            vocab_size: 49152,
            rope_local: None,
            sliding_window: None,
            attention_scale: None,
            attention_logit_softcap: None,
            final_logit_softcap: None,
        }
    }

    fn check_tensor(name: &str, config: &ModelConfig) -> Result<(), ModelError> {
        super::check_tensor(name, &TensorLists::of(config.arch), config)
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
            ("blk.3.attn_k_norm.weight", "only qwen3, gemma3 files"),
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
        let err = err.to_string();
        assert!(
            err.contains("only llama, qwen2, qwen3, gemma3, gemma2 files"),
            "{err}"
        );
        assert!(err.contains("a phi3 layer are attn_norm.weight"), "{err}");
        let gemma3 = config("gemma3");
        assert!(check_tensor("blk.0.post_ffw_norm.weight", &gemma3).is_ok());
        for refused in [
            "blk.0.attn_qkv.weight",
            "blk.0.attn_q.bias",
            "rope_freqs.weight",
        ] {
            assert!(check_tensor(refused, &gemma3).is_err(), "{refused}");
        }
    }
}
