//! SwiGLU, `silu(gate) × up` with `silu(g) = g / (1 + e^-g)`, for one token's row,
//! with the exponential llama.cpp's `ggml_vec_swiglu_f32` uses: the vectorised `e^x`
//! of [`super::softmax`] (ggml's `ggml_v_expf`) instead of one libm call per value.
//! Every path performs the same float operations, so all give the same bits.
//!
//! Unlike ggml, the exponential's input is capped at [`CEILING`], where `e^x` is
//! still finite (this `exp` has no overflow handling): for `g < -88`, `silu(g)` is
//! then `g / (1 + e^88)`, about `g × 6e-39` where the true value is nearly 0 — a
//! difference below 1e-30 for any activation of a working model, though `g = -inf`
//! gives `-inf` instead of NaN.

// The SIMD path is an `unsafe` function called after checking the CPU's features.
#![allow(unsafe_code)]

use super::softmax::exp;
use super::Simd;

/// Largest input of the exponential.
const CEILING: f32 = 88.0;

/// `out[i] = silu(gate[i]) × up[i]` for the common length of the three (the same
/// length, as the callers pass them).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32], simd: Simd) {
    debug_assert!(gate.len() == up.len() && up.len() == out.len());
    let n = gate.len().min(up.len()).min(out.len());
    let (gate, up, out) = (&gate[..n], &up[..n], &mut out[..n]);
    #[cfg(target_arch = "x86_64")]
    let done = match simd {
        // SAFETY: AVX2 and FMA present (the AVX-512 path implies them); the three
        // slices have length `n`.
        Simd::Avx512 | Simd::Avx2 => unsafe { swiglu_avx2(gate, up, out) },
        Simd::Neon | Simd::Portable => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = {
        let _ = simd;
        0
    };
    for ((y, &g), &u) in out[done..].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
        *y = silu(g) * u;
    }
}

fn silu(g: f32) -> f32 {
    g / (1.0 + exp((-g).min(CEILING)))
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// [`swiglu`] for the whole groups of eight values; returns how many it did.
///
/// # Safety
/// AVX2 and FMA; `gate`, `up` and `out` of the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
    let full = gate.len() / 8 * 8;
    let (one, ceiling) = (_mm256_set1_ps(1.0), _mm256_set1_ps(CEILING));
    for i in (0..full).step_by(8) {
        // SAFETY: `i + 8 <= full <= len` of each slice.
        unsafe {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            // `min(x, ceiling)` returns the ceiling for a NaN `x`, as `f32::min` does.
            let x = _mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), ceiling);
            let silu = _mm256_div_ps(g, _mm256_add_ps(one, super::softmax::exp_avx2(x)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(silu, u));
        }
    }
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_the_exact_value_everywhere() {
        let mut g = -120f32;
        while g < 120.0 {
            let mut y = [0f32];
            swiglu(&[g], &[1.5], &mut y, Simd::Portable);
            let x = g as f64;
            let want = x / (1.0 + (-x).exp()) * 1.5;
            let tolerance = 4.0 * f64::from(f32::EPSILON) * want.abs() + 1e-35;
            assert!(
                (y[0] as f64 - want).abs() <= tolerance,
                "silu({g}): {} vs {want}",
                y[0]
            );
            g += 0.0137;
        }
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        for n in [1, 7, 8, 13, 64, 1536, 1541] {
            let gate: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 2003) as f32 - 1000.0) / 9.0)
                .chain([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0])
                .collect();
            let up: Vec<f32> = gate
                .iter()
                .enumerate()
                .map(|(i, _)| i as f32 * 0.3 - 5.0)
                .collect();
            let mut reference = vec![0f32; gate.len()];
            swiglu(&gate, &up, &mut reference, Simd::Portable);
            for simd in Simd::available() {
                let mut ours = vec![0f32; gate.len()];
                swiglu(&gate, &up, &mut ours, simd);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&ours), bits(&reference), "{simd:?}, {n}");
            }
        }
    }
}
