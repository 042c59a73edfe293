//! Gemma 2 against llama.cpp's llama-server on the same file. No Gemma 2 file is small
//! enough to fetch for tests, so the real Gemma 3 270M (`ALLMENDE_GEMMA3`) is dressed
//! as one (`scripts/dress-gemma2.py`, run by `ALLMENDE_TEST_PYTHON`): no per-head Q/K
//! norms (Q and K weights scaled to make up for them), attention and final logit soft-caps, local and global layers alternating
//! with a window of 64, then requantized by llama.cpp to F16 and Q8_0. In both, prompts
//! longer than the window tokenize and continue greedily as llama.cpp's up to
//! near-ties, and the model split between local and global layers equals itself
//! unsplit, bit for bit.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use allmende_node::model::{GgufFile, ModelConfig};
use support::agreement::{counting, prose, Subject};
use support::gguf_writer::{Gguf, GGML_F32};
use support::llama_cpp::{fresh, requantized, work_dir};

/// The dressed file's window.
const WINDOW: usize = 64;

/// The dressed file, made once per change of its source or of the script.
fn dressed() -> &'static Path {
    static DRESSED: OnceLock<PathBuf> = OnceLock::new();
    DRESSED.get_or_init(|| {
        let source = support::gemma3_path();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/dress-gemma2.py");
        let target = work_dir("gemma2").join("gemma2-dressed.gguf");
        if fresh(&target, &[&source, &script]) {
            return target;
        }
        let python = std::env::var("ALLMENDE_TEST_PYTHON").expect(
            "ALLMENDE_TEST_PYTHON is not set: the Python with the gguf package (scripts/test.sh sets it)",
        );
        let made = Command::new(python)
            .arg(&script)
            .arg(&source)
            .arg(&target)
            .output()
            .expect("python runs");
        assert!(
            made.status.success(),
            "dress-gemma2.py failed: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        target
    })
}

fn subject(kind: &str) -> Subject {
    Subject::new(&requantized(dressed(), "gemma2", kind), "gemma")
}

fn f16() -> &'static Subject {
    static SUBJECT: OnceLock<Subject> = OnceLock::new();
    SUBJECT.get_or_init(|| subject("F16"))
}

fn q8_0() -> &'static Subject {
    static SUBJECT: OnceLock<Subject> = OnceLock::new();
    SUBJECT.get_or_init(|| subject("Q8_0"))
}

/// Prompts of about three windows.
fn long_prompts() -> [String; 2] {
    [counting(60), prose(6)]
}

/// Short prompts, then ones of more than two windows.
fn generates_as_llama_cpp(subject: &Subject) {
    let short = ["The capital of France is", "def fibonacci(n):"];
    subject.generates_as_llama_cpp(&short, &long_prompts(), 2 * WINDOW, 24);
}

#[test]
fn reads_gemma2s_keys() {
    let config = &q8_0().ours.model.config;
    assert_eq!(config.arch.name(), "gemma2");
    assert_eq!(config.attention_logit_softcap, Some(50.0));
    assert_eq!(config.final_logit_softcap, Some(30.0));
    let window = config.sliding_window.as_ref().expect("a sliding window");
    assert_eq!(window.window, WINDOW);
    // llama.cpp's pattern for Gemma 2: even layers local, odd ones global.
    let local: Vec<bool> = (0..config.block_count).map(|i| i % 2 == 0).collect();
    assert_eq!(window.local, local);
    assert_eq!(config.rope_local.map(|r| r.freq_base), Some(10_000.0));
}

#[test]
fn f16_generates_as_llama_cpp_up_to_near_ties() {
    generates_as_llama_cpp(f16());
}

#[test]
fn q8_0_generates_as_llama_cpp_up_to_near_ties() {
    generates_as_llama_cpp(q8_0());
}

/// Cut where local and global layers meet both ways round (layer 0 is local, 1
/// global), over a session longer than the window: the same tokens and the same
/// log-probabilities, bit for bit, as the unsplit model.
#[test]
fn split_equals_unsplit_bit_for_bit() {
    let ours = &q8_0().ours;
    let prompt = ours.model.tokenizer.encode(&counting(60)).unwrap();
    assert!(prompt.len() > 2 * WINDOW, "{} tokens", prompt.len());
    let cuts = [(0, 1), (1, 4), (4, 9), (9, 18)];
    ours.split_equals_unsplit(&cuts, &prompt, 8);
}

/// A small Gemma 2 header: four layers, and the embeddings (8 tokens of width 64),
/// with `edit` applied; its hyper-parameters as the loader reads them, or its error.
fn config_of(edit: impl FnOnce(Gguf) -> Gguf) -> Result<ModelConfig, String> {
    let header = Gguf::default()
        .string("general.architecture", "gemma2")
        .u32("gemma2.block_count", 4)
        .u32("gemma2.context_length", 8192)
        .u32("gemma2.embedding_length", 64)
        .u32("gemma2.feed_forward_length", 128)
        .u32("gemma2.attention.head_count", 2)
        .u32("gemma2.attention.head_count_kv", 1)
        .f32("gemma2.attention.layer_norm_rms_epsilon", 1e-6)
        .tensor("token_embd.weight", &[64, 8], GGML_F32, 64 * 8 * 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gemma2.gguf");
    std::fs::write(&path, edit(header).bytes()).unwrap();
    let gguf = GgufFile::open(&path).map_err(|e| e.to_string())?;
    ModelConfig::from_gguf(&gguf).map_err(|e| e.to_string())
}

/// Without the keys, llama.cpp's defaults: a window of 4096 on even layers, both caps,
/// and local layers turning like global ones.
#[test]
fn files_without_gemma2s_keys_get_llama_cpps_defaults() {
    let config = config_of(|g| g).unwrap();
    let window = config.sliding_window.expect("a sliding window");
    assert_eq!(window.window, 4096);
    assert_eq!(window.local, [true, false, true, false]);
    assert_eq!(config.attention_logit_softcap, Some(50.0));
    assert_eq!(config.final_logit_softcap, Some(30.0));
    assert_eq!(config.rope_local, None);
}

/// A cap or window of 0, which llama.cpp would divide by or mask everything with, and
/// an LM head of the file's own, which llama.cpp refuses, are refused by name.
#[test]
fn caps_and_windows_of_zero_and_own_lm_heads_are_refused() {
    for key in [
        "gemma2.attn_logit_softcapping",
        "gemma2.final_logit_softcapping",
        "gemma2.attention.sliding_window",
    ] {
        let err = config_of(|g| match key.ends_with("window") {
            true => g.u32(key, 0),
            false => g.f32(key, 0.0),
        })
        .unwrap_err();
        assert!(err.contains(key), "{key}: {err}");
    }
    let err = config_of(|g| g.tensor("output.weight", &[64, 8], GGML_F32, 64 * 8 * 4)).unwrap_err();
    assert!(err.contains("output.weight"), "{err}");
}
