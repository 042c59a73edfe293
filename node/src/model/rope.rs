//! Rotary position embeddings as llama.cpp computes them: pairs of adjacent values
//! (its "normal" rope, for Llama GGUFs, whose converter permutes Q and K to match)
//! or of values half a head apart ("neox", for Qwen and Phi-3); Llama 3.1 and later
//! divide each pair's angle by a frequency factor (`rope_freqs.weight`), linear
//! RoPE scaling multiplies every angle by `1 / factor`, and YaRN ([`Yarn`]) blends
//! scaled and unscaled angles by frequency and scales the rotation.
//!
//! The tables come from the `libm` crate's `powf`, `cosf` and `sinf`, not the
//! platform's: glibc picks FMA or plain variants at run time and other C libraries
//! differ, and the rotation must give the same bits on every machine.

use candle_core::{bail, Result};

/// How RoPE pairs a head's values for rotation; each architecture says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)`: llama.cpp's "normal" rope, for which its
    /// converter permutes Llama's Q and K rows.
    Adjacent,
    /// Pairs `(i, i + d/2)`: llama.cpp's "neox" rope, the checkpoints' own layout.
    Halves,
}

/// What a model's RoPE is: everything but the positions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeSpec {
    pub head_dim: usize,
    pub freq_base: f32,
    /// Linear scaling's `1 / factor`; 1 without scaling.
    pub freq_scale: f32,
    pub style: RopeStyle,
    pub yarn: Option<Yarn>,
}

/// YaRN ("NTK-by-parts" interpolation with attention scaling), as llama.cpp and
/// transformers compute it: pairs that turn fewer than `beta_slow` (1) times over the
/// original context keep their unscaled angles, pairs that turn more than
/// `beta_fast` (32) times are scaled as linear scaling would, those between blend
/// the two along a ramp; cos and sin are multiplied by `1 + 0.1 ln(factor)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    /// The ramp's ends, as pair indices (ggml's `corr_dims`).
    pub low: f32,
    pub high: f32,
    pub mscale: f32,
}

impl Yarn {
    const BETA_FAST: f32 = 32.0;
    const BETA_SLOW: f32 = 1.0;

    /// YaRN for a model of `head_dim`-wide heads trained on `original_context`
    /// positions, scaled by `factor`.
    pub fn new(head_dim: usize, freq_base: f32, factor: f32, original_context: usize) -> Self {
        let dims = head_dim as f32;
        // ggml_rope_yarn_corr_dim: the pair index that turns `rotations` times.
        let corr = |rotations: f32| {
            let turns = original_context as f32 / (rotations * 2.0 * std::f32::consts::PI);
            dims * libm::logf(turns) / (2.0 * libm::logf(freq_base))
        };
        Yarn {
            low: libm::floorf(corr(Self::BETA_FAST)).max(0.0),
            high: libm::ceilf(corr(Self::BETA_SLOW)).min(dims - 1.0),
            mscale: 0.1 * libm::logf(factor) + 1.0,
        }
    }

    /// The share of pair `i`'s angle that stays unscaled (1 below the ramp, 0 above).
    fn unscaled(&self, i: usize) -> f32 {
        let y = (i as f32 - self.low) / (self.high - self.low).max(0.001);
        1.0 - y.clamp(0.0, 1.0)
    }
}

pub struct Rope {
    /// `cos(theta)` and `sin(theta)` per position, `head_dim / 2` values each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    style: RopeStyle,
}

impl Rope {
    /// Tables for positions `0..max_positions`. Angles are built as ggml builds them,
    /// `theta_i = pos * base^(-2i/d)` accumulated by repeated f32 multiplication, then
    /// divided by pair i's frequency factor where the model has them and multiplied
    /// by the linear scale, so the rotation matches llama.cpp to the last bit
    /// wherever the maths libraries agree.
    pub fn new(spec: RopeSpec, max_positions: usize, factors: Option<&[f32]>) -> Result<Self> {
        let RopeSpec {
            head_dim,
            freq_base,
            freq_scale,
            style,
            yarn,
        } = spec;
        let half = head_dim / 2;
        if half == 0 {
            bail!("head size {head_dim} is too small for rotary embeddings");
        }
        if let Some(f) = factors {
            if f.len() != half || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                bail!("RoPE frequency factors must be {half} positive numbers");
            }
        }
        let theta_scale = libm::powf(freq_base, -2.0 / head_dim as f32);
        let Some(table_len) = max_positions.checked_mul(half) else {
            bail!("RoPE tables for {max_positions} positions of head size {head_dim} overflow");
        };
        let mut cos = Vec::with_capacity(table_len);
        let mut sin = Vec::with_capacity(table_len);
        for pos in 0..max_positions {
            let mut theta = pos as f32;
            for i in 0..half {
                let angle = match factors {
                    Some(f) => theta / f[i],
                    None => theta,
                };
                // `1 × angle` is `angle`: unscaled models keep their bits.
                let scaled = freq_scale * angle;
                let (angle, mscale) = match yarn {
                    None => (scaled, 1.0),
                    Some(y) => {
                        let keep = y.unscaled(i);
                        (scaled * (1.0 - keep) + angle * keep, y.mscale)
                    }
                };
                cos.push(libm::cosf(angle) * mscale);
                sin.push(libm::sinf(angle) * mscale);
                theta *= theta_scale;
            }
        }
        Ok(Self {
            cos,
            sin,
            half,
            style,
        })
    }

    /// One head's row `x` (`head_dim` values) rotated for position `pos`, written to
    /// `out`: each pair `(x0, x1)` becomes `(x0 cos - x1 sin, x0 sin + x1 cos)`, as
    /// candle's `rope_i` (adjacent pairs) and `rope` (halves) compute it.
    pub fn rotate_into(&self, x: &[f32], out: &mut [f32], pos: usize) -> Result<()> {
        let half = self.half;
        if x.len() != 2 * half || out.len() != 2 * half || (pos + 1) * half > self.cos.len() {
            bail!(
                "cannot rotate {} values at position {pos} (head size {}, {} positions)",
                x.len(),
                2 * half,
                self.cos.len() / half
            );
        }
        let (cos, sin) = (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        );
        match self.style {
            RopeStyle::Adjacent => {
                let pairs = x.chunks_exact(2).zip(out.chunks_exact_mut(2));
                for ((pair, y), (&c, &s)) in pairs.zip(cos.iter().zip(sin)) {
                    let (x0, x1) = (pair[0], pair[1]);
                    y[0] = x0 * c - x1 * s;
                    y[1] = x0 * s + x1 * c;
                }
            }
            RopeStyle::Halves => {
                let (x_lo, x_hi) = x.split_at(half);
                let (y_lo, y_hi) = out.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1, c, s) = (x_lo[i], x_hi[i], cos[i], sin[i]);
                    y_lo[i] = x0 * c - x1 * s;
                    y_hi[i] = x0 * s + x1 * c;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(head_dim: usize, style: RopeStyle) -> RopeSpec {
        RopeSpec {
            head_dim,
            freq_base: 10_000.0,
            freq_scale: 1.0,
            style,
            yarn: None,
        }
    }

    type CandleRope = fn(
        &candle_core::Tensor,
        &candle_core::Tensor,
        &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor>;

    /// Our rotation of random rows in `style` equals candle's `theirs`, bit for bit;
    /// returns the rope and one row for further checks.
    fn rotates_as(style: RopeStyle, theirs: CandleRope) -> (Rope, Vec<f32>) {
        use candle_core::{Device, Tensor};
        let (hd, positions) = (8, 5);
        let rope = Rope::new(spec(hd, style), positions, None).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, positions, hd), &Device::Cpu).unwrap();
        let cos = Tensor::from_vec(rope.cos.clone(), (positions, hd / 2), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(rope.sin.clone(), (positions, hd / 2), &Device::Cpu).unwrap();
        let theirs = theirs(&x, &cos, &sin).unwrap();
        let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, row) in values.chunks_exact(hd).enumerate() {
            let mut ours = vec![0f32; hd];
            rope.rotate_into(row, &mut ours, i % positions).unwrap();
            assert_eq!(ours, theirs[i * hd..][..hd], "row {i}");
        }
        (rope, values[..hd].to_vec())
    }

    #[test]
    fn rotates_as_candle_does() {
        let (rope, row) = rotates_as(RopeStyle::Adjacent, candle_nn::rotary_emb::rope_i);
        let (hd, positions) = (row.len(), 5);
        let mut out = vec![0f32; hd];
        assert!(rope.rotate_into(&row, &mut out, positions).is_err());
        assert!(rope
            .rotate_into(&row[..hd - 2], &mut out[..hd - 2], 0)
            .is_err());
    }

    #[test]
    fn halves_rotate_as_candles_neox_rope() {
        rotates_as(RopeStyle::Halves, candle_nn::rotary_emb::rope);
    }

    #[test]
    fn frequency_factors_divide_each_pairs_angle() {
        let (hd, positions) = (8, 6);
        let plain = Rope::new(spec(hd, RopeStyle::Adjacent), positions, None).unwrap();
        let ones = Rope::new(spec(hd, RopeStyle::Adjacent), positions, Some(&[1.0; 4])).unwrap();
        assert_eq!((&plain.cos, &plain.sin), (&ones.cos, &ones.sin));
        let factors = [1.0, 2.0, 4.0, 8.0];
        let scaled = Rope::new(spec(hd, RopeStyle::Adjacent), positions, Some(&factors)).unwrap();
        let theta_scale = libm::powf(10_000.0, -2.0 / hd as f32);
        for pos in 0..positions {
            let mut theta = pos as f32;
            for (i, f) in factors.iter().enumerate() {
                assert_eq!(scaled.cos[pos * 4 + i], libm::cosf(theta / f));
                theta *= theta_scale;
            }
        }
        let adjacent = spec(hd, RopeStyle::Adjacent);
        assert!(Rope::new(adjacent, positions, Some(&[1.0; 3])).is_err());
        assert!(Rope::new(adjacent, positions, Some(&[1.0, 0.0, 1.0, 1.0])).is_err());
    }

    /// YaRN against transformers' formulation in f64 (`_compute_yarn_parameters`:
    /// the blend made on inverse frequencies, the attention factor on cos and sin).
    #[test]
    fn yarn_blends_frequencies_as_transformers_does() {
        let (hd, base, factor, original, positions) = (64, 10_000f32, 4f32, 2048, 300);
        let yarn = Yarn::new(hd, base, factor, original);
        assert_eq!((yarn.low, yarn.high), (8.0, 21.0));
        let spec = RopeSpec {
            freq_scale: 1.0 / factor,
            yarn: Some(yarn),
            ..spec(hd, RopeStyle::Halves)
        };
        let rope = Rope::new(spec, positions, None).unwrap();
        let attention_factor = 0.1 * (factor as f64).ln() + 1.0;
        for i in 0..hd / 2 {
            let extrapolation = (base as f64).powf(-2.0 * i as f64 / hd as f64);
            let interpolation = extrapolation / factor as f64;
            let ramp = ((i as f64 - 8.0) / (21.0 - 8.0)).clamp(0.0, 1.0);
            let inv = interpolation * ramp + extrapolation * (1.0 - ramp);
            for pos in [0, 1, 17, 299] {
                let angle = pos as f64 * inv;
                let (c, s) = (rope.cos[pos * hd / 2 + i], rope.sin[pos * hd / 2 + i]);
                assert!(
                    (c as f64 - angle.cos() * attention_factor).abs() < 1e-4,
                    "{i} {pos}"
                );
                assert!(
                    (s as f64 - angle.sin() * attention_factor).abs() < 1e-4,
                    "{i} {pos}"
                );
            }
        }
    }

    #[test]
    fn linear_scaling_multiplies_each_angle() {
        let (hd, positions) = (8, 6);
        let scaled = RopeSpec {
            freq_scale: 0.25,
            ..spec(hd, RopeStyle::Adjacent)
        };
        let rope = Rope::new(scaled, positions, None).unwrap();
        let theta_scale = libm::powf(10_000.0, -2.0 / hd as f32);
        for pos in 0..positions {
            let mut theta = pos as f32;
            for i in 0..hd / 2 {
                assert_eq!(rope.sin[pos * 4 + i], libm::sinf(0.25 * theta));
                theta *= theta_scale;
            }
        }
    }
}
