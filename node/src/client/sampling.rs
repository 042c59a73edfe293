//! Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::model::kernels::{softmax, Simd};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number ≥ 0, got {0}")]
    Temperature(f32),
    #[error("top-p must be in (0, 1], got {0}")]
    TopP(f32),
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: SmallRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SmallRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let candidates = candidates(logits, &self.params);
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for &(id, p) in &candidates {
            acc += p;
            if r < acc {
                return id;
            }
        }
        // `r` past the sum by rounding (or no candidates): the most likely token.
        argmax(logits)
    }
}

/// Index of the largest logit; the lowest index wins a tie, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    // The best value so far in a register (NaN is never greater), not re-read and
    // checked for NaN at every step: a fifth of a millisecond per token before.
    let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            (best, best_value) = (i, v);
        }
    }
    best as u32
}

/// The tokens left after top-k and top-p with renormalised probabilities: most likely
/// first when a cut applies, else every token in id order (sampling walks them either
/// way). Never sorts the whole vocabulary, which took longer than the rest of a
/// token's work on the client: the top-k are selected in linear time and sorted, and
/// a nucleus is found by sorting ever larger heads of the vocabulary until they hold
/// `top_p` of the mass. The order is strict (probability, then id), so each head is
/// exactly that much of the fully sorted list.
fn candidates(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    let mut tokens = valid_tokens(logits);
    if params.top_k > 0 && params.top_k < tokens.len() {
        tokens.select_nth_unstable_by(params.top_k - 1, more_likely);
        tokens.truncate(params.top_k);
        tokens.sort_unstable_by(more_likely);
    }
    if tokens.is_empty() {
        return tokens;
    }
    // The attention kernels' softmax (vectorised exp): libm's, one call per token,
    // took a millisecond per token over the whole vocabulary.
    let mut weights: Vec<f32> = tokens.iter().map(|c| c.1 / params.temperature).collect();
    let (_, sums) = softmax::softmax_rows(&mut weights, tokens.len(), Simd::in_use());
    let total = sums.first().copied().unwrap_or(1.0);
    for (c, w) in tokens.iter_mut().zip(&weights) {
        c.1 = w / total;
    }
    if params.top_p < 1.0 {
        // Tokens below this share hold less than `1 - top_p` of the mass together, so
        // the nucleus is among the others.
        let floor = (1.0 - params.top_p) / tokens.len() as f32;
        tokens.retain(|c| c.1 >= floor);
        let kept = nucleus(&mut tokens, params.top_p);
        tokens.truncate(kept);
        let kept_mass: f32 = tokens.iter().map(|c| c.1).sum();
        tokens.iter_mut().for_each(|c| c.1 /= kept_mass);
    }
    tokens
}

/// `(id, logit)` of every logit that is a number.
fn valid_tokens(logits: &[f32]) -> Vec<(u32, f32)> {
    logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (i as u32, v))
        .collect()
}

/// Higher probability first, then lower id: a strict order on distinct tokens.
fn more_likely(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// How many of the most likely tokens reach `top_p` of the mass, with those tokens
/// moved to the front in order (cheaply, when they are in order already: top-k).
fn nucleus(tokens: &mut [(u32, f32)], top_p: f32) -> usize {
    let (mut done, mut head, mut mass) = (0, 64, 0.0);
    while done < tokens.len() {
        let end = (done + head).min(tokens.len());
        let rest = &mut tokens[done..];
        if end - done < rest.len() {
            rest.select_nth_unstable_by(end - done - 1, more_likely);
        }
        rest[..end - done].sort_unstable_by(more_likely);
        for (i, c) in tokens[done..end].iter().enumerate() {
            mass += c.1;
            if mass >= top_p {
                return done + i + 1;
            }
        }
        done = end;
        head *= 4;
    }
    tokens.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
        assert_eq!(argmax(&[-2.0, f32::NAN, -1.0, -1.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 0.5, 2.0]), 2);
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [4.0, 3.0, 2.0, 1.0, 0.0];
        let c = candidates(&logits, &params(1.0, 2, 1.0, 0));
        assert_eq!(c.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((c.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6);
        // p(0) ≈ 0.64, p(0)+p(1) ≈ 0.87: top-p 0.8 keeps two tokens.
        let c = candidates(&logits, &params(1.0, 0, 0.8, 0));
        assert_eq!(c.len(), 2);
        let c = candidates(&logits, &params(1.0, 0, 0.5, 0));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_temperature_spreads_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let distinct: std::collections::HashSet<_> = run(7).into_iter().collect();
        assert!(distinct.len() > 5, "sampling should vary: {distinct:?}");
    }

    /// The candidates as the whole vocabulary sorted once gives them.
    fn fully_sorted(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
        let mut sorted = valid_tokens(logits);
        sorted.sort_unstable_by(more_likely);
        if params.top_k > 0 {
            sorted.truncate(params.top_k);
        }
        let max = sorted.first().map_or(0.0, |c| c.1);
        let total: f32 = sorted
            .iter_mut()
            .map(|c| {
                c.1 = ((c.1 - max) / params.temperature).exp();
                c.1
            })
            .sum();
        sorted.iter_mut().for_each(|c| c.1 /= total);
        let mut mass = 0.0;
        let kept = sorted
            .iter()
            .position(|c| {
                mass += c.1;
                mass >= params.top_p
            })
            .map_or(sorted.len(), |i| i + 1);
        if params.top_p < 1.0 {
            sorted.truncate(kept);
        }
        let kept_mass: f32 = sorted.iter().map(|c| c.1).sum();
        sorted.iter_mut().for_each(|c| c.1 /= kept_mass);
        sorted
    }

    #[test]
    fn candidates_equal_those_of_a_full_sort() {
        let mut rng = SmallRng::seed_from_u64(3);
        for n in [1, 7, 64, 65, 300, 5000] {
            // Repeated values too, so ties are broken by id.
            let mut logits: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() * 40.0).round() * 0.5 - 8.0)
                .collect();
            if n > 10 {
                logits[3] = f32::NAN;
            }
            for temperature in [0.3, 1.0, 1.7] {
                for top_k in [0, 1, 40, n, n + 5] {
                    for top_p in [0.2, 0.9, 0.99, 1.0] {
                        let p = params(temperature, top_k, top_p, 0);
                        let ours = candidates(&logits, &p);
                        let reference = fully_sorted(&logits, &p);
                        let valid = logits.iter().filter(|v| !v.is_nan()).count();
                        let cut = (top_k > 0 && top_k < valid) || top_p < 1.0;
                        let mut ours_by_id = ours.clone();
                        if !cut {
                            // No cut: every token, in id order.
                            assert!(ours.windows(2).all(|w| w[0].0 < w[1].0));
                            ours_by_id.sort_unstable_by(more_likely);
                        }
                        let case = format!("n {n} t {temperature} k {top_k} p {top_p}");
                        // The exp differs from libm's by rounding, so the nucleus may
                        // end one token earlier or later, at a token of tiny mass.
                        let (long, short) = match ours_by_id.len() >= reference.len() {
                            true => (&ours_by_id, &reference),
                            false => (&reference, &ours_by_id),
                        };
                        assert!(
                            long.len() - short.len() <= usize::from(top_p < 1.0),
                            "{case}"
                        );
                        if let Some(extra) = long.get(short.len()) {
                            assert!(extra.1 < 1e-3, "{case}: {extra:?} at the edge");
                        }
                        // Relative; f32 sums over thousands of weights in other orders.
                        let tolerance = if long.len() == short.len() {
                            1e-4
                        } else {
                            2e-3
                        };
                        for (a, b) in short.iter().zip(long.iter()) {
                            assert_eq!(a.0, b.0, "{case}");
                            assert!(
                                (a.1 - b.1).abs() <= tolerance * b.1.max(1e-3),
                                "{case}: {a:?} against {b:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(0.7, 0, 0.0, 0).validate().is_err());
        assert!(params(0.7, 0, 1.5, 0).validate().is_err());
        assert!(params(0.7, 40, 0.9, 0).validate().is_ok());
    }
}
