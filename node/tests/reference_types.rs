//! Every tensor type, end to end, against llama.cpp on the same files: the test model
//! requantized by llama.cpp's llama-quantize to each type, and llama-server's greedy
//! continuations with top log-probabilities on each (made by
//! `scripts/reference-models.sh`; `scripts/test.sh` passes their directory as
//! `ALLMENDE_REFERENCE_DIR`).
//!
//! Per file and prompt: the prompt tokenizes to llama.cpp's ids; the greedy tokens
//! are llama.cpp's up to the first divergence, where our margin must be a near-tie
//! or within the tolerance of the exact reference's; up to there, each chosen token's
//! log-probability and those of the top-5 tokens both sides list agree within the
//! tolerances below.
//!
//! llama.cpp is itself an approximation (16-bit queries in its attention, its own
//! rounding), so the same script also computes the exact reference: the file's
//! weights dequantized and the forward in float64 (`scripts/reference/exact.py`).
//! It decides every divergence (the exact reference may not prefer llama.cpp's token
//! by more than a near-tie), excuses a disagreement with llama.cpp where ours is the
//! closer to it, within the tolerance of it, or no farther from it than llama.cpp
//! comes anywhere in the file, and bounds ours: no farther from the
//! exact log-probabilities than llama.cpp is
//! (with a little room), and per-layer hidden states close to the exact ones. Run
//! as one-layer shards, every file's model equals its unsplit self bit for bit.

mod support;

use std::ops::ControlFlow;
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

/// Ours may be this much farther from the exact log-probabilities than llama.cpp is,
/// on average over a file's compared positions (at each, the largest distance over
/// the tokens listed), or up to the floor, whichever is larger. Both sides quantize
/// activations to 8 bits in quantized files, each with its own rounding, so their
/// distances are noise of one size, not equal; the floor covers float files, where
/// ours is measured nearer than llama.cpp.
const EXACT_RATIO: f32 = 1.5;
const EXACT_FLOOR: f32 = 0.05;

/// Worst relative error (L2 norm of the difference over that of the exact state) of
/// the prompt's last hidden state after any layer, against the exact reference, for
/// files of 16-bit floats, whose arithmetic is the exact function's up to f32
/// rounding and the 16-bit KV cache. In quantized files both sides quantize
/// activations at every product, another function than the exact one: their
/// per-layer errors are reported, and their outputs bounded by the log-probabilities.
const HIDDEN_FLOAT: f64 = 0.05;

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
    /// The exact reference's file, beside this one.
    exact: String,
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
struct Exact {
    outputs: Vec<ExactContinuation>,
}

/// The exact reference along llama.cpp's continuation: the top log-probabilities
/// after each position (the prompt's last on), and for some prompts the prompt's
/// last hidden state after each layer.
#[derive(Deserialize)]
struct ExactContinuation {
    top_logprobs: Vec<Vec<Top>>,
    prompt_hidden: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct Top {
    token_id: u32,
    logprob: f32,
}

/// What one model's comparison found, for the summary.
#[derive(Default)]
struct Summary {
    identical: Vec<String>,
    worst_logprob: f32,
    worst_chosen: f32,
    /// Farthest each side came from the exact log-probabilities: (ours, llama.cpp).
    from_exact: (f32, f32),
    /// Sums of each position's distance from them, and the number of positions.
    from_exact_sum: (f32, f32, usize),
    worst_hidden: f64,
    divergences: Vec<String>,
    failures: Vec<String>,
    /// Disagreements with llama.cpp beyond the tolerances where ours is not the closer
    /// to the exact reference, with ours' distance from it: failures unless that
    /// distance is within the tolerance or within llama.cpp's own worst in the file
    /// (known once the file is done).
    suspects: Vec<(f32, f32, String)>,
}

/// The largest distance of `list`'s log-probabilities from the exact ones, over the
/// tokens the exact reference lists.
fn distance(list: &[(u32, f32)], exact: &[Top]) -> f32 {
    list.iter()
        .filter_map(|(id, lp)| {
            let e = exact.iter().find(|e| e.token_id == *id)?;
            Some((lp - e.logprob).abs())
        })
        .fold(0.0, f32::max)
}

fn compare(
    model: &ClientModel,
    shard: &Arc<Shard>,
    (r, exact): (&Continuation, &ExactContinuation),
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
        let ours_i: Vec<(u32, f32)> = std::iter::once((ours.token_ids[i], logprobs[i].logprob))
            .chain(logprobs[i].top.iter().map(|t| (t.token_id, t.logprob)))
            .collect();
        let theirs_i: Vec<(u32, f32)> = std::iter::once((r.token_ids[i], r.logprobs[i]))
            .chain(r.top_logprobs[i].iter().map(|t| (t.token_id, t.logprob)))
            .collect();
        let ours_from_exact = distance(&ours_i, &exact.top_logprobs[i]);
        let theirs_from_exact = distance(&theirs_i, &exact.top_logprobs[i]);
        s.from_exact.0 = s.from_exact.0.max(ours_from_exact);
        s.from_exact.1 = s.from_exact.1.max(theirs_from_exact);
        s.from_exact_sum.0 += ours_from_exact;
        s.from_exact_sum.1 += theirs_from_exact;
        s.from_exact_sum.2 += 1;
        // A disagreement with llama.cpp is excused where ours is the closer to the
        // exact reference, or itself within the tolerance of it, or no farther from it
        // than llama.cpp comes anywhere in the same file: both sides are
        // approximations with noise of their own (ours quantizes activations per 32
        // values for every type, llama.cpp per 256 for K-quants), and a position where
        // llama.cpp happens to be near the exact value and ours less near differs by
        // the two noises added. A wrong formula is far from the exact values
        // everywhere, which these bounds and the mean below catch.
        let ours_closer = ours_from_exact <= theirs_from_exact;
        let chosen = (logprobs[i].logprob - r.logprobs[i]).abs();
        s.worst_chosen = s.worst_chosen.max(chosen);
        if chosen > tolerance.0 && !ours_closer {
            s.suspects.push((
                ours_from_exact,
                tolerance.0,
                format!(
                    "{:?} position {i}: the chosen token's log-probability differs by {chosen:.3} (ours {ours_from_exact:.3} from the exact one)",
                    r.prompt
                ),
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
        if diff > tolerance.1 && !ours_closer {
            s.suspects.push((
                ours_from_exact,
                tolerance.1,
                format!(
                    "{:?} position {i}: log-probabilities differ by {diff:.3} (token {}: ours {:.3}, llama.cpp {:.3})",
                    r.prompt, worst.0, worst.1, worst.2
                ),
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
    // Where each side's token is missing from the other's list, only the exact
    // reference can say which side is wrong.
    let (here, there) = (here.unwrap_or(f32::NAN), there.unwrap_or(f32::NAN));
    let exact_list: Vec<(u32, f32)> = exact.top_logprobs[i]
        .iter()
        .map(|t| (t.token_id, t.logprob))
        .collect();
    // The exact margin of our token over llama.cpp's: positive where ours is right.
    let Some(margin) = find(&exact_list, mine)
        .zip(find(&exact_list, theirs))
        .map(|(a, b)| a - b)
    else {
        s.failures.push(format!(
            "{:?} position {i}: ours {mine} or llama.cpp's {theirs} is not in the exact top {}",
            r.prompt,
            exact_list.len()
        ));
        return;
    };
    // Our margin is a near-tie, or as far from the exact one as a log-probability
    // may be (a clear preference the exact reference shares, less clearly).
    if here > NEAR_TIE && (here - margin).abs() > tolerance.0 {
        s.failures.push(format!(
            "{:?} position {i}: ours {mine} by {here:.3} over llama.cpp's {theirs}, by {margin:.3} in the exact reference",
            r.prompt
        ));
    }
    // Where the exact reference clearly prefers our token, llama.cpp's is the error.
    if margin < -NEAR_TIE {
        s.failures.push(format!(
            "{:?} position {i}: the exact reference prefers llama.cpp's {theirs} by {:.3}: not a near-tie",
            r.prompt, -margin
        ));
    }
    let winner = if margin >= 0.0 { "ours" } else { "llama.cpp" };
    s.divergences.push(format!(
        "@{i} {here:.2}/{there:.2} exact: {winner} by {:.3}",
        margin.abs()
    ));
}

#[test]
fn every_type_generates_as_llama_cpp_up_to_near_ties() {
    let dir = support::reference_dir();
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
        let exact: Exact =
            serde_json::from_str(&std::fs::read_to_string(dir.join(&m.exact)).unwrap()).unwrap();
        assert_eq!(exact.outputs.len(), m.outputs.len(), "{}", m.exact);
        let float = matches!(m.kind.as_str(), "F16" | "BF16" | "F32");
        let mut summary = Summary::default();
        for (r, e) in m.outputs.iter().zip(&exact.outputs) {
            assert_eq!(r.token_ids.len(), references.tokens);
            let tolerance = match float {
                true => TOLERANCE_FLOAT,
                false => TOLERANCE_QUANTIZED,
            };
            compare(
                &model,
                &shard,
                (r, e),
                references.top,
                tolerance,
                &mut summary,
            );
            if !e.prompt_hidden.is_empty() {
                let worst = hidden_error(
                    &path,
                    (&model, &shard),
                    &r.prompt_token_ids,
                    &e.prompt_hidden,
                );
                summary.worst_hidden = summary.worst_hidden.max(worst);
            }
        }
        let (ours, theirs) = summary.from_exact;
        for (distance, tolerance, failure) in std::mem::take(&mut summary.suspects) {
            if distance > tolerance.max(theirs) {
                summary.failures.push(failure);
            }
        }
        let (sum_ours, sum_theirs, n) = summary.from_exact_sum;
        let (mean_ours, mean_theirs) = (sum_ours / n.max(1) as f32, sum_theirs / n.max(1) as f32);
        if mean_ours > (EXACT_RATIO * mean_theirs).max(EXACT_FLOOR) {
            summary.failures.push(format!(
                "ours is on average {mean_ours:.3} from the exact log-probabilities, llama.cpp {mean_theirs:.3}"
            ));
        }
        if float && summary.worst_hidden > HIDDEN_FLOAT {
            summary.failures.push(format!(
                "a layer's hidden state is {:.4} (relative) from the exact one",
                summary.worst_hidden
            ));
        }
        table.push(format!(
            "{:<22} identical {:<16} vs llama.cpp ≤ {:.3} (chosen {:.3}); from exact, mean/max: ours {:.3}/{:.3}, llama.cpp {:.3}/{:.3}; hidden {:.4}; divergences (ours/llama.cpp margin) {} {}",
            m.file.trim_end_matches(".gguf"),
            summary.identical.join("/"),
            summary.worst_logprob,
            summary.worst_chosen,
            mean_ours,
            ours,
            mean_theirs,
            theirs,
            summary.worst_hidden,
            summary.divergences.join(" "),
            m.tensor_types
        ));
        failures.extend(summary.failures.iter().map(|f| format!("{}: {f}", m.kind)));
    }
    eprintln!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The worst relative error, over the layers, of the prompt's last hidden state after
/// each layer against the exact reference's: each layer run as a shard of its own,
/// the way a route splits the model. The split model's output must equal the
/// unsplit `whole`'s, bit for bit, in every architecture.
fn hidden_error(
    path: &std::path::Path,
    (model, whole): (&ClientModel, &Shard),
    prompt: &[u32],
    exact: &[Vec<f64>],
) -> f64 {
    let mut gguf = GgufFile::open(path).unwrap();
    let input = model.head.embed(prompt).unwrap();
    let mut x = input.clone();
    let mut worst = 0f64;
    for (layer, exact) in exact.iter().enumerate() {
        let range = LayerRange::new(layer as u32, layer as u32 + 1);
        let shard = Shard::from_gguf(
            &mut gguf,
            model.config.clone(),
            range,
            &indicatif::ProgressBar::hidden(),
        )
        .unwrap();
        let mut cache = shard.new_cache(prompt.len());
        x = shard.forward(&x, &mut cache).unwrap();
        let last: Vec<f32> = x
            .narrow(1, prompt.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mut diff, mut norm) = (0f64, 0f64);
        for (a, e) in last.iter().zip(exact) {
            diff += (*a as f64 - e).powi(2);
            norm += e * e;
        }
        worst = worst.max((diff / norm.max(f64::MIN_POSITIVE)).sqrt());
    }
    let unsplit = whole
        .forward(&input, &mut whole.new_cache(prompt.len()))
        .unwrap();
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    };
    assert!(
        bits(&x) == bits(&unsplit),
        "{}: one-layer shards differ from the unsplit model",
        path.display()
    );
    worst
}
