//! The unsplit model against llama.cpp on the same GGUF: tokenization, logits and
//! greedy continuations.
//!
//! Why tolerances at all: llama.cpp and this crate quantize activations (Q8_1/Q8_0)
//! and round in different places, and this 30-layer model amplifies such differences.
//! Measured on the first prompt's last position (all 49152 logits): this crate vs an
//! f64 reference with dequantized weights differs by 0.14 rms, llama.cpp vs the same
//! reference by 0.23 rms (0.75 max), and this crate vs llama.cpp by 0.25 rms. Rounding
//! only the K/V cache to f16 (a 2^-11 relative change) moves this crate's logits by
//! about as much. Changing only the order in which the Q4_1 kernel sums (outputs
//! differing by ~3e-7 relative, a few ulps) moved them to 0.38 rms from llama.cpp, 0.38
//! at worst in its top-10; rounding the 8-bit activations as ggml does (half to even)
//! instead of as candle does gave 0.44 rms, 0.21 at worst in the top-10; the Q4_1
//! kernel's earlier arithmetic (ggml's AVX2 order: per block, eight lanes of four
//! products each scaled, in two lane groups, offsets summed apart) gave 0.24 and 0.18.
//! The kernel now sums each block exactly in integers and adds it with two fused
//! multiply-adds per row (see `kernels::q4_1`): its outputs are within 3e-6 relative of
//! the exact per-block formula on the model's own matrices (the earlier arithmetic:
//! 7e-6 on random ones), and its logits were 0.46 rms from llama.cpp, 0.40 at worst in
//! the top-10, with keys and values cached in f32 (the same kernel with the offsets
//! summed apart: 0.49 and 0.42). Caching them in f16, as llama.cpp does by default,
//! brought that to 0.33 rms and 0.28. So tokens are compared exactly except where
//! llama.cpp itself reports a near-tie, and logits within [`LOGIT_TOLERANCE`].

mod support;

use std::sync::Arc;

use allmende_node::client::sampling::argmax;
use allmende_node::client::{ClientModel, LocalPipeline, Pipeline};
use allmende_node::model::{GgufFile, Shard};
use allmende_protocol::LayerRange;
use indicatif::ProgressBar;

/// Largest accepted difference between a logit here and llama.cpp's: above the top-10
/// deviations that ulp-level changes of the arithmetic produced (0.16–0.42), and well
/// below the spread across the whole vocabulary between two correct implementations
/// (0.75–0.84).
const LOGIT_TOLERANCE: f32 = 0.5;

/// A greedy step whose top-2 log-probability margin is below this is a near-tie:
/// implementations that differ by the noise above may pick either token.
const NEAR_TIE: f32 = 0.5;

fn load() -> (ClientModel, Arc<Shard>) {
    let mut gguf = GgufFile::open(&support::model_path()).unwrap();
    let model = ClientModel::from_gguf(&mut gguf).unwrap();
    let all = LayerRange::new(0, model.config.block_count as u32);
    let shard =
        Shard::from_gguf(&mut gguf, model.config.clone(), all, &ProgressBar::hidden()).unwrap();
    (model, Arc::new(shard))
}

/// Greedy decoding that also returns the logits each token was chosen from.
fn greedy(
    model: &ClientModel,
    shard: &Arc<Shard>,
    prompt: &[u32],
    n: usize,
) -> Vec<(u32, Vec<f32>)> {
    let mut pipeline = LocalPipeline::new(vec![shard.clone()], prompt.len() + n);
    let hidden = pipeline
        .forward(&model.head.embed(prompt).unwrap())
        .unwrap();
    let mut logits = model.head.last_logits(&hidden).unwrap();
    let mut steps = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        steps.push((next, logits.clone()));
        let hidden = pipeline
            .forward(&model.head.embed(&[next]).unwrap())
            .unwrap();
        logits = model.head.last_logits(&hidden).unwrap();
    }
    steps
}

fn log_softmax_margin(logits: &[f32], a: u32, b: u32) -> f32 {
    // The softmax normaliser cancels in a difference of log-probabilities.
    logits[a as usize] - logits[b as usize]
}

#[test]
fn tokenization_matches_llama_cpp() {
    let mut gguf = GgufFile::open(&support::model_path()).unwrap();
    let model = ClientModel::from_gguf(&mut gguf).unwrap();
    for out in support::golden().outputs {
        assert_eq!(
            model.tokenizer.encode(&out.prompt).unwrap(),
            out.prompt_token_ids,
            "prompt {:?}",
            out.prompt
        );
        assert_eq!(
            model.tokenizer.decode(&out.generated_token_ids).unwrap(),
            out.generated_text,
            "decoding the continuation of {:?}",
            out.prompt
        );
    }
}

#[test]
fn last_logits_agree_with_llama_cpp() {
    let (model, shard) = load();
    let golden = support::golden();
    let steps = greedy(&model, &shard, &golden.outputs[0].prompt_token_ids, 1);
    let logits = &steps[0].1;
    let top = &golden.prompt1_last_position_top10_logits;
    for t in top {
        let ours = logits[t.id as usize];
        assert!(
            (ours - t.logit).abs() <= LOGIT_TOLERANCE,
            "token {}: {ours} here, {} in llama.cpp",
            t.id,
            t.logit
        );
    }
    // Our top-10 is llama.cpp's top-10, but for tokens at its edge: one of ours that is
    // not in llama.cpp's top-10 must lie within the tolerance of its 10th logit there.
    let reference = support::golden_prompt1_logits();
    let mut ours: Vec<u32> = (0..logits.len() as u32).collect();
    ours.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let tenth = top[9].logit;
    for id in &ours[..10] {
        if !top.iter().any(|t| t.id == *id) {
            let theirs = reference[*id as usize];
            assert!(
                theirs >= tenth - 2.0 * LOGIT_TOLERANCE,
                "token {id} is in our top-10 but llama.cpp gives it {theirs} (10th: {tenth})"
            );
        }
    }
    // Same order, except between entries llama.cpp itself puts within the combined
    // tolerance of each other (near-ties whose order is numerical noise).
    for (i, a) in top.iter().enumerate() {
        for b in &top[i + 1..] {
            if a.logit - b.logit > 2.0 * LOGIT_TOLERANCE {
                assert!(
                    logits[a.id as usize] > logits[b.id as usize],
                    "token {} should rank above {}",
                    a.id,
                    b.id
                );
            }
        }
    }
    // And the whole distribution stays close.
    let rms = (logits
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        / logits.len() as f32)
        .sqrt();
    // Measured: 0.25–0.44 over the arithmetic variants above; llama.cpp itself is 0.23
    // from an f64 reference.
    let worst_top10 = top
        .iter()
        .map(|t| (logits[t.id as usize] - t.logit).abs())
        .fold(0f32, f32::max);
    eprintln!("logits vs llama.cpp: rms {rms:.3}, largest top-10 difference {worst_top10:.3}");
    assert!(rms < 0.5, "rms logit difference {rms}");
}

#[test]
fn greedy_continuations_match_llama_cpp_up_to_near_ties() {
    let (model, shard) = load();
    for out in support::golden().outputs {
        let steps = greedy(
            &model,
            &shard,
            &out.prompt_token_ids,
            out.generated_token_ids.len(),
        );
        let ours: Vec<u32> = steps.iter().map(|s| s.0).collect();
        let Some(i) = ours
            .iter()
            .zip(&out.generated_token_ids)
            .position(|(a, b)| a != b)
        else {
            eprintln!("{:?}: all {} tokens identical", out.prompt, ours.len());
            continue;
        };
        // A divergence is acceptable only at a near-tie in both implementations.
        let (theirs, mine) = (out.generated_token_ids[i], ours[i]);
        let margin_here = log_softmax_margin(&steps[i].1, mine, theirs);
        let margin_there = out.top2_logprob_margins[i];
        eprintln!(
            "{:?}: identical for {i} tokens, then {mine} here vs {theirs} in llama.cpp \
             (margin {margin_here:.4} here, {margin_there:.4} there)",
            out.prompt
        );
        assert!(
            margin_there < NEAR_TIE && margin_here < NEAR_TIE,
            "{:?} diverges at token {i} without a near-tie: {ours:?} vs {:?}",
            out.prompt,
            out.generated_token_ids
        );
    }
}
