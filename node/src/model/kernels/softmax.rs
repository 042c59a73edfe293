//! A chunk's attention weights: `exp(score - max)` for every score, their maximum and
//! sum. The arithmetic is fixed, so every path gives the same bits:
//!
//! - `exp` as ggml's `ggml_v_expf` computes it for llama.cpp's softmax: `x = n ln 2 +
//!   b` with `n` rounded to an integer, `2^n` from the exponent bits and `e^b` from a
//!   degree-5 polynomial (within 1.5 ulp of the true value); inputs below -87, where
//!   `2^n` would leave the normal range, give 0 (the true value is below 2^-125 and the
//!   sum it joins is at least 1);
//! - the sum in eight lanes (weight `i` into lane `i % 8`, in position order), the
//!   lanes then added as `v[i] + v[i + 4]`, then `(0 + 2) + (1 + 3)`.
//!
//! One call of libm's `expf` per score and a sum in position order, as before, took
//! 12% of a batch of 8 decode steps at 1,000 positions; each waited on the last.

// The SIMD path is an `unsafe` function called after checking the CPU's features.
#![allow(unsafe_code)]

use super::Simd;

/// Lanes of the sum.
const LANES: usize = 8;
/// Below this, `exp` gives 0.
const FLOOR: f32 = -87.0;

/// `0x1.8p23`: adding it rounds a float below 2^22 in magnitude to an integer.
const ROUND: u32 = 0x4b40_0000;
/// log2(e).
const LOG2E: u32 = 0x3fb8_aa3b;
/// ln 2 in two parts, high and low.
const LN2_HI: u32 = 0x3f31_7200;
const LN2_LO: u32 = 0x35bf_be8e;
/// The polynomial's coefficients, of `b` to `b^5`.
const C1: u32 = 0x3f7f_fff6;
const C2: u32 = 0x3eff_fedb;
const C3: u32 = 0x3e2a_af33;
const C4: u32 = 0x3d2b_9f17;
const C5: u32 = 0x3c07_2010;

fn f(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// Each head's row of `positions` scores → weights, in place: the heads' maxima and
/// the sums of their weights.
pub fn softmax_rows(scores: &mut [f32], positions: usize, simd: Simd) -> (Vec<f32>, Vec<f32>) {
    let heads = scores.len() / positions.max(1);
    let (mut max, mut sum) = (Vec::with_capacity(heads), Vec::with_capacity(heads));
    for scores in scores.chunks_exact_mut(positions.max(1)) {
        let m = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut lanes = [0f32; LANES];
        #[cfg(target_arch = "x86_64")]
        if matches!(simd, Simd::Avx512 | Simd::Avx2) {
            // SAFETY: AVX2 and FMA present (the AVX-512 path implies them).
            unsafe { weights_avx2(scores, m, &mut lanes) };
        } else {
            weights_portable(scores, m, &mut lanes);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = simd;
            weights_portable(scores, m, &mut lanes);
        }
        max.push(m);
        sum.push(sum_lanes(lanes));
    }
    (max, sum)
}

fn weights_portable(scores: &mut [f32], max: f32, lanes: &mut [f32; LANES]) {
    for (i, s) in scores.iter_mut().enumerate() {
        *s = exp(*s - max);
        lanes[i % LANES] += *s;
    }
}

fn sum_lanes(v: [f32; LANES]) -> f32 {
    let quad = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (quad[0] + quad[2]) + (quad[1] + quad[3])
}

/// `e^x`, as the module describes.
pub fn exp(x: f32) -> f32 {
    if x < FLOOR {
        return 0.0;
    }
    let z = x.mul_add(f(LOG2E), f(ROUND));
    let n = z - f(ROUND);
    let b = (-n).mul_add(f(LN2_LO), (-n).mul_add(f(LN2_HI), x));
    let k = f32::from_bits((z.to_bits() << 23).wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = f(C5)
        .mul_add(b, f(C4))
        .mul_add(u, f(C3).mul_add(b, f(C2)))
        .mul_add(u, f(C1) * b);
    j.mul_add(k, k)
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// [`exp`] of eight values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_avx2(x: __m256) -> __m256 {
    let c = |bits: u32| _mm256_set1_ps(f(bits));
    let z = _mm256_fmadd_ps(x, c(LOG2E), c(ROUND));
    let n = _mm256_sub_ps(z, c(ROUND));
    let b = _mm256_fnmadd_ps(n, c(LN2_LO), _mm256_fnmadd_ps(n, c(LN2_HI), x));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        _mm256_slli_epi32::<23>(_mm256_castps_si256(z)),
        _mm256_set1_epi32(1f32.to_bits() as i32),
    ));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(C5), b, c(C4)),
            u,
            _mm256_fmadd_ps(c(C3), b, c(C2)),
        ),
        u,
        _mm256_mul_ps(c(C1), b),
    );
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(FLOOR));
    _mm256_andnot_ps(below, _mm256_fmadd_ps(j, k, k))
}

/// [`weights_portable`], eight scores at a time.
///
/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weights_avx2(scores: &mut [f32], max: f32, lanes: &mut [f32; LANES]) {
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut chunks = scores.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        // SAFETY: `chunk` holds 8 floats; unaligned loads and stores of that size.
        unsafe {
            let w = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), m));
            _mm256_storeu_ps(chunk.as_mut_ptr(), w);
            acc = _mm256_add_ps(acc, w);
        }
    }
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    for (i, s) in chunks.into_remainder().iter_mut().enumerate() {
        *s = exp(*s - max);
        lanes[i] += *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_and_zero_below_the_floor() {
        let mut x = 0f32;
        while x > -90.0 {
            let got = exp(x);
            if x < FLOOR {
                assert_eq!(got, 0.0, "exp({x})");
            } else {
                let want = (x as f64).exp();
                let ulp = f64::from(f32::EPSILON) * want;
                assert!(
                    (got as f64 - want).abs() <= 2.0 * ulp,
                    "exp({x}) = {got}, not {want}"
                );
            }
            x -= 0.000_731;
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        for positions in [1, 7, 8, 13, 64, 301] {
            let scores: Vec<f32> = (0..3 * positions)
                .map(|i| ((i * 7919 % 2003) as f32 - 1500.0) / 16.0)
                .collect();
            let mut reference = scores.clone();
            let expected = softmax_rows(&mut reference, positions, Simd::Portable);
            for simd in Simd::available() {
                let mut ours = scores.clone();
                let got = softmax_rows(&mut ours, positions, simd);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&ours), bits(&reference), "{simd:?}, {positions}");
                assert_eq!(bits(&got.0), bits(&expected.0), "{simd:?}, {positions}");
                assert_eq!(bits(&got.1), bits(&expected.1), "{simd:?}, {positions}");
            }
        }
    }
}
