//! Every SIMD path gives the same bits on real files: `allmende generate --local` on
//! the reference files of each kernel's types (`scripts/reference-models.sh`), once per
//! path the CPU has (`ALLMENDE_SIMD`), with identical tokens and log-probabilities to
//! the last bit. The kernels' unit tests check the same on random matrices; this runs
//! them together with every other kernel of a forward pass (norms, RoPE, attention,
//! SwiGLU, the LM head) on the files users bring.

mod support;

use std::process::Command;

use support::reference_dir;
use support::swarm::{binary, json_of};

/// Files whose tensors cover every type with its own kernel: Q4_K, Q5_0, Q6_K and
/// Q8_0; Q5_K and Q5_1; Q4_0; Q4_1; IQ4_NL; F16; BF16.
const FILES: &[&str] = &[
    "smollm2-Q4_K_M.gguf",
    "smollm2-Q5_K_M.gguf",
    "smollm2-Q4_0.gguf",
    "smollm2-Q4_1.gguf",
    "smollm2-IQ4_NL.gguf",
    "smollm2-F16.gguf",
    "smollm2-BF16.gguf",
];

const PATHS: &[&str] = &["avx512", "avx2", "neon", "portable"];

#[test]
fn every_path_generates_the_same_bits_on_real_files() {
    let dir = reference_dir();
    for file in FILES {
        let model = dir.join(file);
        // (path the process reports, its tokens and log-probabilities as f32 bits)
        let mut runs: Vec<(String, Vec<u64>, Vec<u32>)> = Vec::new();
        for path in PATHS {
            let out = Command::new(binary())
                .args(["generate", "--local", "--model"])
                .arg(&model)
                .args(["--prompt", "Once upon a time, in a small village,"])
                .args(["--max-tokens", "6", "--ignore-eos", "--threads", "2"])
                .args(["--json", "--logprobs", "3"])
                .env("ALLMENDE_SIMD", path)
                .output()
                .expect("allmende runs");
            let report = json_of(&out);
            let kernels = report["kernels"].as_str().unwrap().to_string();
            let ids: Vec<u64> = report["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let mut bits = Vec::new();
            for entry in report["logprobs"].as_array().unwrap() {
                bits.push((entry["logprob"].as_f64().unwrap() as f32).to_bits());
                for alt in entry["top"].as_array().unwrap() {
                    bits.push((alt["logprob"].as_f64().unwrap() as f32).to_bits());
                }
            }
            assert_eq!(ids.len(), 6, "{file} on {kernels}");
            // A path the CPU lacks runs its best one: count each path once.
            if runs.iter().all(|(k, _, _)| *k != kernels) {
                runs.push((kernels, ids, bits));
            }
        }
        assert!(
            runs.iter().any(|(k, _, _)| k == "portable"),
            "the portable path always runs"
        );
        let (first, ids, bits) = &runs[0];
        for (other, other_ids, other_bits) in &runs[1..] {
            assert_eq!(
                ids, other_ids,
                "{file}: {first} and {other} choose other tokens"
            );
            assert_eq!(
                bits, other_bits,
                "{file}: {first} and {other} give other log-probabilities"
            );
        }
        eprintln!(
            "{file}: {} paths agree",
            runs.iter()
                .map(|r| r.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
