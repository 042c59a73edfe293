//! A model file with anything the loader does not understand is refused with an error
//! that names it, never run: the real model rewritten (with a real GGUF writer) with
//! one addition each, run through `allmende generate --local`. A neutral addition
//! (linear RoPE scaling by 1, key length equal to the head size) still runs, to the
//! same tokens.

mod support;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use support::swarm::allmende;

type Metadata = Vec<(String, Value)>;
type Tensors = Vec<(String, QTensor)>;

/// The test model, rewritten to `dir/name` after `edit` changed its metadata and tensors.
fn rewritten(dir: &Path, name: &str, edit: impl FnOnce(&mut Metadata, &mut Tensors)) -> PathBuf {
    let mut reader = BufReader::new(File::open(support::model_path()).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut metadata: Metadata = content.metadata.clone().into_iter().collect();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Tensors = names
        .into_iter()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut reader, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    edit(&mut metadata, &mut tensors);
    let path = dir.join(name);
    let mut out = File::create(&path).unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    path
}

fn f32_tensor(len: usize, value: f32) -> QTensor {
    let t = (Tensor::ones(len, DType::F32, &Device::Cpu).unwrap() * value as f64).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

/// `generate --local --json` on `model`, or on the test model itself.
fn generate(model: Option<&Path>) -> std::process::Output {
    let mut args = vec![
        "generate",
        "--local",
        "--prompt",
        "The capital of France is",
    ];
    args.extend(["--max-tokens", "6", "--json"]);
    if let Some(model) = model {
        args.extend(["--model", model.to_str().unwrap()]);
    }
    allmende(&args)
}

fn refused(model: &Path, expected: &[&str]) {
    let out = generate(Some(model));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{} ran", model.display());
    for part in expected {
        assert!(err.contains(part), "stderr lacks {part:?}:\n{err}");
    }
    assert!(err.contains("refuses to run it"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn set(metadata: &mut Metadata, key: &str, value: Value) {
    metadata.retain(|(k, _)| k != key);
    metadata.push((key.to_string(), value));
}

#[test]
fn every_kind_of_unknown_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let m = rewritten(d, "output-bias.gguf", |_, t| {
        t.push(("blk.0.attn_output.bias".into(), f32_tensor(576, 0.01)));
    });
    refused(
        &m,
        &["tensor blk.0.attn_output.bias", "bias is not applied"],
    );

    let m = rewritten(d, "q-bias-only.gguf", |_, t| {
        t.push(("blk.0.attn_q.bias".into(), f32_tensor(576, 0.01)));
    });
    refused(&m, &["layer 0 has biases on some of Q, K and V only"]);

    let m = rewritten(d, "q-norm.gguf", |_, t| {
        t.push(("blk.4.attn_q_norm.weight".into(), f32_tensor(64, 1.0)));
    });
    refused(&m, &["tensor blk.4.attn_q_norm.weight", "qwen3"]);

    let m = rewritten(d, "longrope.gguf", |md, _| {
        set(
            md,
            "llama.rope.scaling.type",
            Value::String("longrope".into()),
        );
        set(md, "llama.rope.scaling.factor", Value::F32(4.0));
    });
    refused(
        &m,
        &[
            "llama.rope.scaling.factor = 4",
            "\"longrope\"",
            "only linear and YaRN",
        ],
    );

    // YaRN computes with its default betas and factors only.
    let m = rewritten(d, "yarn-beta.gguf", |md, _| {
        set(md, "llama.rope.scaling.type", Value::String("yarn".into()));
        set(md, "llama.rope.scaling.factor", Value::F32(4.0));
        set(md, "llama.rope.scaling.yarn_beta_fast", Value::F32(16.0));
    });
    refused(&m, &["llama.rope.scaling.yarn_beta_fast"]);

    let m = rewritten(d, "gemma.gguf", |md, _| {
        set(md, "general.architecture", Value::String("gemma".into()));
    });
    let out = generate(Some(&m));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("\"gemma\"")
            && err.contains("llama, qwen2, qwen3, phi3"),
        "{err}"
    );

    let m = rewritten(d, "sliding-window.gguf", |md, _| {
        set(md, "llama.attention.sliding_window", Value::U32(4096));
    });
    refused(&m, &["metadata llama.attention.sliding_window = 4096"]);

    let m = rewritten(d, "split.gguf", |md, _| {
        set(md, "split.count", Value::U16(2));
        set(md, "split.no", Value::U16(0));
    });
    refused(&m, &["metadata split.count = 2", "split GGUF files"]);

    let m = rewritten(d, "prefix-space.gguf", |md, _| {
        set(md, "tokenizer.ggml.add_space_prefix", Value::Bool(true));
    });
    refused(&m, &["metadata tokenizer.ggml.add_space_prefix"]);

    let m = rewritten(d, "adapter.gguf", |md, _| {
        set(md, "adapter.type", Value::String("lora".into()));
    });
    refused(&m, &["metadata adapter.type = \"lora\""]);
}

#[test]
fn neutral_settings_still_run_to_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let m = rewritten(dir.path(), "neutral.gguf", |md, _| {
        set(
            md,
            "llama.rope.scaling.type",
            Value::String("linear".into()),
        );
        set(md, "llama.rope.scaling.factor", Value::F32(1.0));
        set(md, "llama.attention.key_length", Value::U32(64));
        set(md, "llama.attention.value_length", Value::U32(64));
        set(md, "llama.expert_count", Value::U32(0));
    });
    let original = generate(None);
    let neutral = generate(Some(&m));
    assert_eq!(
        support::swarm::ids(&support::swarm::json_of(&neutral)),
        support::swarm::ids(&support::swarm::json_of(&original))
    );
}

#[test]
fn rope_frequency_factors_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let with = |name: &str, factors: QTensor| {
        rewritten(dir.path(), name, |_, t| {
            t.push(("rope_freqs.weight".into(), factors))
        })
    };
    let ids = |m: &Path| support::swarm::ids(&support::swarm::json_of(&generate(Some(m))));
    let original = support::swarm::ids(&support::swarm::json_of(&generate(None)));
    // Factors of one leave every angle as it was, to the bit.
    assert_eq!(ids(&with("ones.gguf", f32_tensor(32, 1.0))), original);
    // Slowing every frequency eightfold changes the model.
    assert_ne!(ids(&with("eights.gguf", f32_tensor(32, 8.0))), original);
    let wrong = with("short.gguf", f32_tensor(16, 1.0));
    let err = String::from_utf8_lossy(&generate(Some(&wrong)).stderr).to_string();
    assert!(
        err.contains("tensor rope_freqs.weight has shape [16], expected [32]"),
        "{err}"
    );
}
