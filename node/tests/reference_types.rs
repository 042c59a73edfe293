//! Every tensor type, end to end, against llama.cpp on the same files: the test model
//! requantized by llama.cpp's llama-quantize to each type, and llama-server's greedy
//! continuations with top log-probabilities on each (made by
//! `scripts/reference-models.sh`; `scripts/test.sh` passes their directory as
//! `ALLMENDE_REFERENCE_DIR`).
//!
//! Per file and prompt: the prompt tokenizes to llama.cpp's ids; the greedy tokens
//! are llama.cpp's up to the first divergence, which must be a near-tie on both sides;
//! up to there, each chosen token's log-probability and those of the top-5 tokens both
//! sides list agree within the tolerances below.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use allmende_node::client::{
    generate, ClientModel, GenerationParams, LocalPipeline, SamplingParams,
};
use allmende_node::model::{GgufFile, Shard};
use allmende_protocol::LayerRange;
use serde::Deserialize;

/// A divergence where either side prefers its token by less than this (in nats) is a
/// near-tie: the two implementations round differently (llama.cpp's activations are
/// quantized per block as ours are, but its sums run in another order), and the
/// exact function itself is this close there.
const NEAR_TIE: f32 = 0.5;

/// Log-probabilities agree within these many nats at every position before any
/// divergence: (the chosen token's, the other tokens of llama.cpp's top 5). Files of
/// 16-bit floats are computed from the same weights on both sides, up to summation
/// order and llama.cpp's 16-bit rounding of activations (measured: ≤ 0.07 chosen,
/// ≤ 0.11 for the others). Quantized files add each side's own 8-bit quantization of
/// the activations, which is noise of its own at every one of the 30 layers and 32
/// positions: measured ≤ 0.38 on chosen tokens and up to 1.17 on alternatives in
/// the tail (log-probabilities of −4 to −13, where a logit error shows whole). The
/// bounds leave a third more room than was measured; they catch a wrong formula,
/// which moves every log-probability by far more.
const TOLERANCE_FLOAT: (f32, f32) = (0.1, 0.15);
const TOLERANCE_QUANTIZED: (f32, f32) = (0.5, 1.5);

/// Types llama-quantize makes that this version refuses, and the error that names why.
const REFUSED: &[(&str, &str)] = &[];

#[derive(Deserialize)]
struct References {
    tokens: usize,
    top: usize,
    models: Vec<ModelReference>,
}

#[derive(Deserialize)]
struct ModelReference {
    #[serde(rename = "type")]
    kind: String,
    file: String,
    tensor_types: serde_json::Value,
    outputs: Vec<Continuation>,
}

#[derive(Deserialize)]
struct Continuation {
    prompt: String,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
    logprobs: Vec<f32>,
    top_logprobs: Vec<Vec<Top>>,
}

#[derive(Deserialize)]
struct Top {
    token_id: u32,
    logprob: f32,
}

fn reference_dir() -> PathBuf {
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

/// What one model's comparison found, for the summary.
#[derive(Default)]
struct Summary {
    identical: Vec<String>,
    worst_logprob: f32,
    worst_chosen: f32,
    divergences: Vec<String>,
    failures: Vec<String>,
}

fn compare(
    model: &ClientModel,
    shard: &Arc<Shard>,
    r: &Continuation,
    top: usize,
    tolerance: (f32, f32),
    s: &mut Summary,
) {
    let prompt = model.tokenizer.encode(&r.prompt).unwrap();
    assert_eq!(prompt, r.prompt_token_ids, "tokenization of {:?}", r.prompt);
    let params = GenerationParams {
        max_tokens: r.token_ids.len(),
        sampling: SamplingParams::default(),
        ignore_eos: true,
        logprobs: Some(top),
    };
    let mut pipeline = LocalPipeline::new(vec![shard.clone()], prompt.len() + params.max_tokens);
    let ours = generate(model, &mut pipeline, &prompt, &params, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let logprobs = ours.logprobs.unwrap();
    let diverged = ours
        .token_ids
        .iter()
        .zip(&r.token_ids)
        .position(|(a, b)| a != b);
    let agreed = diverged.unwrap_or(r.token_ids.len());
    #[allow(clippy::needless_range_loop)] // three lists by position
    for i in 0..agreed {
        let chosen = (logprobs[i].logprob - r.logprobs[i]).abs();
        s.worst_chosen = s.worst_chosen.max(chosen);
        if chosen > tolerance.0 {
            s.failures.push(format!(
                "{:?} position {i}: the chosen token's log-probability differs by {chosen:.3}",
                r.prompt
            ));
        }
        let mut diff = chosen;
        let mut worst = (r.token_ids[i], logprobs[i].logprob, r.logprobs[i]);
        for theirs in &r.top_logprobs[i] {
            let mine = logprobs[i]
                .top
                .iter()
                .find(|t| t.token_id == theirs.token_id);
            if let Some(mine) = mine.filter(|m| (m.logprob - theirs.logprob).abs() > diff) {
                diff = (mine.logprob - theirs.logprob).abs();
                worst = (theirs.token_id, mine.logprob, theirs.logprob);
            }
        }
        if diff > tolerance.1 {
            s.failures.push(format!(
                "{:?} position {i}: log-probabilities differ by {diff:.3} (token {}: ours {:.3}, llama.cpp {:.3})",
                r.prompt, worst.0, worst.1, worst.2
            ));
        }
        s.worst_logprob = s.worst_logprob.max(diff);
    }
    let Some(i) = diverged else {
        s.identical.push(format!("{}", agreed));
        return;
    };
    let (mine, theirs) = (ours.token_ids[i], r.token_ids[i]);
    let find = |list: &[(u32, f32)], id: u32| list.iter().find(|t| t.0 == id).map(|t| t.1);
    let our_list: Vec<(u32, f32)> = logprobs[i]
        .top
        .iter()
        .map(|t| (t.token_id, t.logprob))
        .collect();
    let their_list: Vec<(u32, f32)> = r.top_logprobs[i]
        .iter()
        .map(|t| (t.token_id, t.logprob))
        .collect();
    let here = find(&our_list, mine)
        .zip(find(&our_list, theirs))
        .map(|(a, b)| a - b);
    let there = find(&their_list, theirs)
        .zip(find(&their_list, mine))
        .map(|(a, b)| a - b);
    s.identical.push(format!("{agreed}"));
    let (Some(here), Some(there)) = (here, there) else {
        s.failures.push(format!(
            "{:?} position {i}: ours {mine}, llama.cpp's {theirs}, not in each other's top {top}",
            r.prompt
        ));
        return;
    };
    if here > NEAR_TIE || there > NEAR_TIE {
        s.failures.push(format!(
            "{:?} position {i}: ours {mine} by {here:.3}, llama.cpp's {theirs} by {there:.3}: not a near-tie",
            r.prompt
        ));
    }
    s.divergences.push(format!("@{i} {here:.2}/{there:.2}"));
}

#[test]
fn every_type_generates_as_llama_cpp_up_to_near_ties() {
    let dir = reference_dir();
    let text = std::fs::read_to_string(dir.join("references.json")).unwrap();
    let references: References = serde_json::from_str(&text).unwrap();
    assert!(!references.models.is_empty());
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for m in &references.models {
        let path = dir.join(&m.file);
        let loaded = GgufFile::open(&path).and_then(|mut gguf| {
            let model = ClientModel::from_gguf(&mut gguf)?;
            let all = LayerRange::new(0, model.config.block_count as u32);
            let shard = Shard::from_gguf(
                &mut gguf,
                model.config.clone(),
                all,
                &indicatif::ProgressBar::hidden(),
            )?;
            Ok((model, Arc::new(shard)))
        });
        let expected_refusal = REFUSED.iter().find(|(k, _)| *k == m.kind);
        let (model, shard) = match (loaded, expected_refusal) {
            (Ok(loaded), None) => loaded,
            (Err(e), Some((_, why))) => {
                assert!(e.to_string().contains(why), "{}: {e}", m.kind);
                table.push(format!("{:<7} refused: {e}", m.kind));
                continue;
            }
            (Ok(_), Some(_)) => panic!("{} loads now: take it off REFUSED", m.kind),
            (Err(e), None) => panic!("{} ({}) is refused: {e}", m.kind, m.tensor_types),
        };
        let mut summary = Summary::default();
        for r in &m.outputs {
            assert_eq!(r.token_ids.len(), references.tokens);
            let tolerance = match m.kind.as_str() {
                "F16" | "BF16" | "F32" => TOLERANCE_FLOAT,
                _ => TOLERANCE_QUANTIZED,
            };
            compare(&model, &shard, r, references.top, tolerance, &mut summary);
        }
        table.push(format!(
            "{:<26} tokens identical {:<16} logprob diff ≤ {:.3} (chosen {:.3})  divergences (ours/llama.cpp margin) {:<28} {}",
            m.file.trim_end_matches(".gguf"),
            summary.identical.join("/"),
            summary.worst_logprob,
            summary.worst_chosen,
            summary.divergences.join(" "),
            m.tensor_types
        ));
        failures.extend(summary.failures.iter().map(|f| format!("{}: {f}", m.kind)));
    }
    eprintln!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
