//! Log-probabilities of generated tokens and their most likely alternatives, as
//! `generate --logprobs K` and the OpenAI API report them: natural logarithms of the
//! model's distribution at temperature 1, whatever the sampling settings.

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// The `k` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<TopLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// The log-probability of `chosen` under `logits`, and the `k` most likely tokens.
/// The normaliser is summed in f64, so a 100,000-token vocabulary loses no precision.
pub fn token_logprob(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| (l as f64 - max).exp())
        .sum();
    let log_norm = max + sum.ln();
    let logprob = |id: u32| -> f32 {
        logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| (l as f64 - log_norm) as f32)
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| !logits[i as usize].is_nan())
        .collect();
    let more_likely = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(ids.len());
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, more_likely);
    }
    ids.truncate(k);
    ids.sort_unstable_by(more_likely);
    TokenLogprob {
        token_id: chosen,
        logprob: logprob(chosen),
        top: ids
            .into_iter()
            .map(|id| TopLogprob {
                token_id: id,
                logprob: logprob(id),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NAN];
        let t = token_logprob(&logits, 2, 3);
        let norm: f64 = [1.0f64, 3.0, 2.0, 3.0]
            .iter()
            .map(|l| l.exp())
            .sum::<f64>()
            .ln();
        assert!((t.logprob as f64 - (2.0 - norm)).abs() < 1e-6);
        let top: Vec<u32> = t.top.iter().map(|t| t.token_id).collect();
        assert_eq!(top, [1, 3, 2]);
        assert!((t.top[0].logprob as f64 - (3.0 - norm)).abs() < 1e-6);
        let probs: f64 = [1.0f64, 3.0, 2.0, 3.0]
            .iter()
            .map(|&l| (l - norm).exp())
            .sum();
        assert!((probs - 1.0).abs() < 1e-12);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 0, 99).top.len(), 4);
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let logits = [1000.0f32, 999.0];
        let t = token_logprob(&logits, 0, 2);
        let expected = -(1.0f64 + (-1.0f64).exp()).ln();
        assert!((t.logprob as f64 - expected).abs() < 1e-6, "{}", t.logprob);
    }
}
