//! `allmende generate --local` as a user runs it: the real binary, the real model.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn allmende(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_allmende"))
        .args(args)
        .env("ALLMENDE_MODEL", support::model_path())
        .output()
        .expect("the allmende binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must fail cleanly: non-zero exit, the expected message, no panic.
fn fails_with(args: &[&str], expected: &str) {
    let out = allmende(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(
        err.contains(expected),
        "{args:?}: stderr lacks {expected:?}:\n{err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

fn json_line(out: &Output) -> Value {
    let stdout = String::from_utf8(out.stdout.clone()).expect("utf-8 output");
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).expect("last line is JSON")
}

#[test]
fn greedy_generation_reports_ids_text_and_timings() {
    // The prompt whose continuation starts with the most tokens before llama.cpp's
    // first near-tie (a top-2 margin under 0.5, as in golden.rs): those ids must equal
    // llama.cpp's; after a near-tie either token is correct.
    let golden = &support::golden().outputs[0];
    let exact = golden
        .top2_logprob_margins
        .iter()
        .take_while(|&&margin| margin >= 0.5)
        .count();
    assert!(
        exact >= 5,
        "the golden prompt has {exact} tokens before a near-tie"
    );
    let out = allmende(&[
        "generate",
        "--local",
        "--prompt",
        &golden.prompt,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json_line(&out);
    let ids: Vec<u32> = serde_json::from_value(report["token_ids"].clone()).unwrap();
    assert_eq!(ids.len(), 12);
    assert_eq!(ids[..exact], golden.generated_token_ids[..exact]);
    let prompt_ids: Vec<u32> = serde_json::from_value(report["prompt_token_ids"].clone()).unwrap();
    assert_eq!(prompt_ids, golden.prompt_token_ids);
    // The streamed text, before the JSON line, is the reported text.
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let text = report["text"].as_str().unwrap();
    assert!(
        stdout.starts_with(text),
        "streamed {stdout:?}, reported {text:?}"
    );
    let timings = &report["timings"];
    for key in ["prefill_ms", "decode_tokens_per_s", "total_ms"] {
        assert!(timings[key].as_f64().unwrap() > 0.0, "{key}: {timings}");
    }
    assert_eq!(report["finish_reason"], "length");
}

#[test]
fn chat_mode_wraps_the_prompt_in_the_models_template() {
    let question = "What is the capital of France?";
    let run = |args: &[&str]| {
        let mut all = vec![
            "generate",
            "--local",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--json",
        ];
        all.extend_from_slice(args);
        let out = allmende(&all);
        assert!(out.status.success(), "{}", stderr(&out));
        json_line(&out)
    };
    let chat = run(&["--chat", "--prompt", question]);
    // SmolLM2's ChatML template, with its default system prompt, rendered by hand.
    let by_hand = format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    );
    let raw = run(&["--prompt", &by_hand]);
    assert_eq!(chat["prompt_token_ids"], raw["prompt_token_ids"]);
    assert_eq!(chat["token_ids"], raw["token_ids"]);
    let ids: Vec<u32> = serde_json::from_value(chat["prompt_token_ids"].clone()).unwrap();
    assert_eq!(
        ids.iter().filter(|&&id| id == 1).count(),
        3,
        "three <|im_start|> tokens"
    );
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let args = [
        "generate",
        "--local",
        "--prompt",
        "Open source software is",
        "--max-tokens",
        "16",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--seed",
        "42",
        "--ignore-eos",
        "--json",
    ];
    let a = json_line(&allmende(&args));
    let b = json_line(&allmende(&args));
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_eq!(a["seed"], 42);
}

#[test]
fn bad_arguments_and_prompts_are_refused() {
    fails_with(
        &["generate", "--local", "--prompt", ""],
        "the prompt is empty",
    );
    let long = "1 ".repeat(5000);
    fails_with(
        &["generate", "--local", "--prompt", &long],
        "but the model's context holds 8192",
    );
    fails_with(
        &[
            "generate",
            "--local",
            "--prompt",
            "x",
            "--temperature",
            "-1",
        ],
        "temperature must be",
    );
    fails_with(
        &["generate", "--local", "--prompt", "x", "--top-p", "0"],
        "top-p must be",
    );
    fails_with(
        &["generate", "--local", "--prompt", "x", "--threads", "0"],
        "--threads",
    );
    fails_with(
        &["generate", "--prompt", "x", "--no-mdns"],
        "no way to find the swarm",
    );
    fails_with(
        &[
            "generate",
            "--local",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/1",
            "--prompt",
            "x",
        ],
        "cannot be used with",
    );
    fails_with(
        &["generate", "--bootstrap", "not-an-address", "--prompt", "x"],
        "invalid value 'not-an-address'",
    );
    fails_with(
        &["generate", "--local", "--prompt", "x", "--bogus"],
        "--bogus",
    );
}

fn model_copy(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(support::model_path()).unwrap();
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The byte offset of a GGUF tensor-info entry's type field.
fn tensor_type_offset(bytes: &[u8], tensor: &str) -> usize {
    let mut needle = (tensor.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(tensor.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("tensor info present");
    let after_name = at + needle.len();
    let dims = u32::from_le_bytes(bytes[after_name..after_name + 4].try_into().unwrap()) as usize;
    after_name + 4 + 8 * dims
}

fn generate_with(model: &Path) -> Output {
    allmende(&[
        "generate",
        "--local",
        "--prompt",
        "hi",
        "--model",
        model.to_str().unwrap(),
    ])
}

fn assert_fails(out: Output, expected: &str) {
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains(expected), "stderr lacks {expected:?}:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_model_files_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(
        generate_with(&dir.path().join("absent.gguf")),
        "not found; fetch it with scripts/fetch-model.sh",
    );

    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "this is not a model\n").unwrap();
    assert_fails(generate_with(&text), "is not a GGUF file");

    let cut = model_copy(dir.path(), "cut.gguf", |b| b.truncate(b.len() / 2));
    assert_fails(generate_with(&cut), "is truncated: tensor");
    let cut_header = model_copy(dir.path(), "cut-header.gguf", |b| b.truncate(4096));
    assert_fails(generate_with(&cut_header), "is truncated");

    let iq2 = model_copy(dir.path(), "iq2.gguf", |b| {
        let at = tensor_type_offset(b, "blk.3.attn_q.weight");
        b[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    });
    assert_fails(
        generate_with(&iq2),
        "unsupported tensor type IQ2_XXS (ggml type 16)",
    );

    let q8_1 = model_copy(dir.path(), "q8_1.gguf", |b| {
        let at = tensor_type_offset(b, "blk.3.attn_q.weight");
        b[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    });
    assert_fails(
        generate_with(&q8_1),
        "unsupported tensor type Q8_1 (ggml type 9) for tensor blk.3.attn_q.weight",
    );

    // IQ4_NL matrices are computed; a norm is kept in float and cannot be IQ4_NL.
    let iq4_nl_norm = model_copy(dir.path(), "iq4_nl-norm.gguf", |b| {
        let at = tensor_type_offset(b, "blk.3.attn_norm.weight");
        b[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
    });
    assert_fails(
        generate_with(&iq4_nl_norm),
        "unsupported tensor type IQ4_NL (ggml type 20) for tensor blk.3.attn_norm.weight",
    );

    let gemma = model_copy(dir.path(), "gemma.gguf", |b| {
        let needle = b"general.architecture";
        let at = b.windows(needle.len()).position(|w| w == needle).unwrap();
        // key, then u32 value type, u64 length, then the value "llama".
        let value = at + needle.len() + 4 + 8;
        b[value..value + 5].copy_from_slice(b"gemma");
    });
    assert_fails(
        generate_with(&gemma),
        "unsupported model architecture \"gemma\"",
    );
}

#[test]
fn a_layer_range_outside_the_model_is_refused() {
    use allmende_node::model::Shard;
    use allmende_protocol::LayerRange;
    let err = Shard::load(
        &support::model_path(),
        LayerRange::new(20, 31),
        &indicatif::ProgressBar::hidden(),
    )
    .err()
    .expect("20..31 of a 30-layer model is refused");
    assert_eq!(
        err.to_string(),
        "layer range 20..31 lies outside the model's layers 0..30"
    );
}
