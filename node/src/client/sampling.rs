//! Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

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
        candidates.last().map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// Index of the largest logit; the lowest index wins a tie, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The tokens left after top-k and top-p, with renormalised probabilities, most
/// likely first.
fn candidates(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    let mut sorted: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (i as u32, v))
        .collect();
    sorted.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        sorted.truncate(params.top_k);
    }
    let max = sorted.first().map_or(0.0, |c| c.1);
    let mut total = 0.0;
    for c in sorted.iter_mut() {
        c.1 = ((c.1 - max) / params.temperature).exp();
        total += c.1;
    }
    let mut kept = 0;
    let mut mass = 0.0;
    for c in sorted.iter_mut() {
        c.1 /= total;
        mass += c.1;
        kept += 1;
        if mass >= params.top_p {
            break;
        }
    }
    sorted.truncate(kept);
    let kept_mass: f32 = sorted.iter().map(|c| c.1).sum();
    sorted.iter_mut().for_each(|c| c.1 /= kept_mass);
    sorted
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

    #[test]
    fn rejects_bad_parameters() {
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(0.7, 0, 0.0, 0).validate().is_err());
        assert!(params(0.7, 0, 1.5, 0).validate().is_err());
        assert!(params(0.7, 40, 0.9, 0).validate().is_ok());
    }
}
