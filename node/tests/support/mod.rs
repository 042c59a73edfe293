//! Shared helpers of the integration tests: the real model, the llama.cpp golden
//! outputs (copied into `tests/golden/` from llama.cpp runs on the same file), and
//! real server processes ([`swarm`]).
#![allow(dead_code)]

pub mod agreement;
pub mod attack;
pub mod cgroup;
pub mod file_server;
pub mod gguf_writer;
pub mod http;
pub mod llama_cpp;
pub mod raw;
pub mod swarm;
pub mod wan;

use std::path::PathBuf;

use serde::Deserialize;

/// The test model. Tests fail, rather than skip, without it: run scripts/fetch-model.sh.
pub fn model_path() -> PathBuf {
    let path = allmende_node::paths::default_model();
    assert!(
        path.exists(),
        "test model {} is missing: run scripts/fetch-model.sh (or set ALLMENDE_MODEL)",
        path.display()
    );
    path
}

/// The real Gemma 3 270M file (`scripts/fetch-gemma3.sh`; `scripts/test.sh` passes it
/// as `ALLMENDE_GEMMA3`). Tests fail, rather than skip, without it.
pub fn gemma3_path() -> PathBuf {
    let path = std::env::var_os("ALLMENDE_GEMMA3").map(PathBuf::from).expect(
        "ALLMENDE_GEMMA3 is not set: run scripts/fetch-gemma3.sh and point it at the file it prints (scripts/test.sh does)",
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-gemma3.sh",
        path.display()
    );
    path
}

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

#[derive(Deserialize)]
pub struct Golden {
    pub outputs: Vec<GoldenOutput>,
    pub prompt1_last_position_top10_logits: Vec<TopLogit>,
    pub model_sha256: String,
}

#[derive(Deserialize)]
pub struct GoldenOutput {
    pub prompt: String,
    pub prompt_token_ids: Vec<u32>,
    pub generated_token_ids: Vec<u32>,
    pub generated_text: String,
    pub top2_logprob_margins: Vec<f32>,
}

#[derive(Deserialize)]
pub struct TopLogit {
    pub id: u32,
    pub logit: f32,
}

pub fn golden() -> Golden {
    let path = golden_dir().join("smollm2-135m-q4_1.llama-cpp.json");
    let text = std::fs::read_to_string(&path).expect("golden file is in the repository");
    serde_json::from_str(&text).expect("golden file parses")
}

/// All 49152 logits llama.cpp computed at the last position of the first prompt.
pub fn golden_prompt1_logits() -> Vec<f32> {
    let bytes = std::fs::read(golden_dir().join("smollm2-135m-q4_1.prompt1-last-logits.f32le"))
        .expect("golden logits are in the repository");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Resident memory of process `pid`, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// The most memory process `pid` has held resident at once so far.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

fn status_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("Linux /proc");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("a {key} line"));
    kb * 1024
}

/// The reference models' directory (`scripts/reference-models.sh`; `scripts/test.sh`
/// passes it as `ALLMENDE_REFERENCE_DIR`). Tests fail, rather than skip, without it.
pub fn reference_dir() -> PathBuf {
    let dir = std::env::var_os("ALLMENDE_REFERENCE_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/reference-models"),
        PathBuf::from,
    );
    assert!(
        dir.join("references.json").exists(),
        "{}/references.json is missing: run scripts/reference-models.sh",
        dir.display()
    );
    dir
}
