//! F16 and BF16 weights, kept in their 16 bits, times the activations as they are
//! (f32, not quantized; llama.cpp rounds them to 16 bits first). Widening a 16-bit
//! float to f32 is exact, so every product is the f32 fused multiply-add of the
//! file's weight and the activation.
//!
//! The arithmetic every path performs, per row and token: sixteen f32 lanes, value `j`
//! of a 32-value block added to lane `j % 16` as `acc = fma(w, x, acc)` (values
//! `l` then `l + 16` of each block, blocks in order), then the lanes summed in one
//! fixed tree ([`sum_lanes`]).

// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use std::marker::PhantomData;

use candle_core::quantized::GgmlDType;

use super::activations::Acts;
use super::matrix::WeightBlock;
use super::BLOCK;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// A 16-bit float format: how its bits widen to f32.
pub trait HalfFloat: Copy + Send + Sync + 'static {
    const DTYPE: GgmlDType;
    fn to_f32(bits: u16) -> f32;
    /// Sixteen values at `p` widened.
    ///
    /// # Safety
    /// `p` must point to 16 values; the CPU must support AVX-512F (and F16C).
    #[cfg(target_arch = "x86_64")]
    unsafe fn wide512(p: *const u16) -> __m512;
    /// Eight values at `p` widened.
    ///
    /// # Safety
    /// `p` must point to 8 values; the CPU must support AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn wide256(p: *const u16) -> __m256;
}

/// IEEE half precision.
#[derive(Clone, Copy)]
pub struct F16;

impl HalfFloat for F16 {
    const DTYPE: GgmlDType = GgmlDType::F16;

    fn to_f32(bits: u16) -> f32 {
        half::f16::from_bits(bits).to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn wide512(p: *const u16) -> __m512 {
        // SAFETY: the caller's guarantees.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn wide256(p: *const u16) -> __m256 {
        // SAFETY: the caller's guarantees.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// bfloat16: the upper half of an f32.
#[derive(Clone, Copy)]
pub struct Bf16;

impl HalfFloat for Bf16 {
    const DTYPE: GgmlDType = GgmlDType::BF16;

    fn to_f32(bits: u16) -> f32 {
        f32::from_bits((bits as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn wide512(p: *const u16) -> __m512 {
        // SAFETY: the caller's guarantees.
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn wide256(p: *const u16) -> __m256 {
        // SAFETY: the caller's guarantees.
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
}

/// 32 weights of one row as stored in the file (one cache line).
#[derive(Clone, Copy)]
pub struct Halves<H> {
    w: [u16; BLOCK],
    format: PhantomData<H>,
}

pub type BlockF16 = Halves<F16>;
pub type BlockBf16 = Halves<Bf16>;

/// The lanes' total, in the one order every path uses.
pub fn sum_lanes(acc: [f32; 16]) -> f32 {
    let eight: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let four: [f32; 4] = std::array::from_fn(|l| eight[l] + eight[l + 4]);
    (four[0] + four[2]) + (four[1] + four[3])
}

impl<H: HalfFloat> WeightBlock for Halves<H> {
    const DTYPE: GgmlDType = H::DTYPE;
    const BYTES: usize = 2 * BLOCK;
    const ROWS: usize = 1;
    const SUMS: bool = false;
    const PAIRS: bool = false;
    const FLOAT: bool = true;

    fn parse_rows(rows: &[&[u8]], out: &mut Vec<Self>) {
        let bytes = rows.first().copied().unwrap_or_default();
        out.extend(bytes.chunks_exact(Self::BYTES).map(|b| {
            let mut w = [0u16; BLOCK];
            for (w, two) in w.iter_mut().zip(b.chunks_exact(2)) {
                *w = u16::from_le_bytes([two[0], two[1]]);
            }
            Halves {
                w,
                format: PhantomData,
            }
        }));
    }

    fn dequantize(&self, _lane: usize, out: &mut Vec<f32>) {
        out.extend(self.w.iter().map(|&w| H::to_f32(w)));
    }

    fn dot_portable(row: &[Self], _lane: usize, act: &Acts) -> f32 {
        let mut acc = [0f32; 16];
        for (x, ys) in row.iter().zip(act.values.chunks_exact(BLOCK)) {
            for (j, (&w, &y)) in x.w.iter().zip(ys).enumerate() {
                acc[j % 16] = H::to_f32(w).mul_add(y, acc[j % 16]);
            }
        }
        sum_lanes(acc)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[Self]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        for (r, row) in rows.into_iter().enumerate() {
            // SAFETY: the caller guarantees the CPU features.
            unsafe { simd::row_avx2(row, acts, &mut out[r..], stride) }
        }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[Self]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { simd::tile_avx512(rows, acts, out, stride) }
    }

    /// The portable arithmetic (no Arm kernel yet).
    #[cfg(target_arch = "aarch64")]
    unsafe fn tile_neon<const R: usize>(
        rows: [&[Self]; R],
        acts: &[Acts],
        out: &mut [f32],
        stride: usize,
    ) {
        for (r, row) in rows.into_iter().enumerate() {
            for (t, act) in acts.iter().enumerate() {
                out[t * stride + r] = Self::dot_portable(row, 0, act);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{sum_lanes, Acts, HalfFloat, Halves, BLOCK};
    use crate::model::kernels::driver::cut_each;

    /// How far ahead of the block in use to prefetch weights, in bytes.
    const PREFETCH: usize = 4096;

    #[inline(always)]
    fn prefetch<H>(x: &Halves<H>) {
        let ahead = x.w.as_ptr().cast::<i8>().wrapping_add(PREFETCH);
        // SAFETY: a prefetch only hints; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead) };
    }

    /// One row against `T` tokens into `out[t * stride]`: lanes 0..8 and 8..16 as two
    /// vectors.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn row_avx2<H: HalfFloat, const T: usize>(
        row: &[Halves<H>],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = row.len();
        let xs = cut_each(acts, |a| &a.values[..blocks * BLOCK]);
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        for (b, x) in row.iter().enumerate() {
            prefetch(x);
            // SAFETY: the block's 32 values, widened 8 at a time.
            let w: [__m256; 4] = unsafe {
                let p = x.w.as_ptr();
                [
                    H::wide256(p),
                    H::wide256(p.add(8)),
                    H::wide256(p.add(16)),
                    H::wide256(p.add(24)),
                ]
            };
            for t in 0..T {
                let y = &xs[t][b * BLOCK..][..BLOCK];
                // SAFETY: `y` holds 32 floats; unaligned loads of 8 of them.
                let v = |i: usize| unsafe { _mm256_loadu_ps(y.as_ptr().add(8 * i)) };
                let [lo, hi] = &mut acc[t];
                *lo = _mm256_fmadd_ps(w[0], v(0), *lo);
                *hi = _mm256_fmadd_ps(w[1], v(1), *hi);
                *lo = _mm256_fmadd_ps(w[2], v(2), *lo);
                *hi = _mm256_fmadd_ps(w[3], v(3), *hi);
            }
        }
        for (t, [lo, hi]) in acc.into_iter().enumerate() {
            let mut lanes = [0f32; 16];
            // SAFETY: `lanes` holds 16 floats; two unaligned 8-float stores into it.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
            }
            out[t * stride] = sum_lanes(lanes);
        }
    }

    /// `R` rows against `T` tokens into `out[t * stride + r]`, the sixteen lanes in one
    /// vector.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub fn tile_avx512<H: HalfFloat, const R: usize, const T: usize>(
        rows: [&[Halves<H>]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = rows[0].len();
        let rows = cut_each(rows, |r| &r[..blocks]);
        let xs = cut_each(acts, |a| &a.values[..blocks * BLOCK]);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        for b in 0..blocks {
            let mut w = [[_mm512_setzero_ps(); 2]; R];
            for r in 0..R {
                let x = &rows[r][b];
                prefetch(x);
                // SAFETY: the block's 32 values, widened 16 at a time.
                w[r] = unsafe { [H::wide512(x.w.as_ptr()), H::wide512(x.w.as_ptr().add(16))] };
            }
            for t in 0..T {
                let y = &xs[t][b * BLOCK..][..BLOCK];
                // SAFETY: `y` holds 32 floats; unaligned loads of 16 of them.
                let v = unsafe {
                    [
                        _mm512_loadu_ps(y.as_ptr()),
                        _mm512_loadu_ps(y.as_ptr().add(16)),
                    ]
                };
                for r in 0..R {
                    acc[r][t] = _mm512_fmadd_ps(w[r][0], v[0], acc[r][t]);
                    acc[r][t] = _mm512_fmadd_ps(w[r][1], v[1], acc[r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let mut lanes = [0f32; 16];
                // SAFETY: `lanes` holds 16 floats; an unaligned store of that size.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r][t]) };
                out[t * stride + r] = sum_lanes(lanes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::kernels::tests::{values, weights};
    use crate::model::kernels::{Linear, Matrix, Simd};

    /// Every path against the exact product of the file's weights and the
    /// activations: only f32 rounding may differ.
    fn exact<H: HalfFloat>() {
        for (rows, cols, tokens) in [(33, 576, 3), (8, 2048, 9), (2, 32, 1)] {
            let q = Arc::new(weights(H::DTYPE, rows, cols));
            let w = values(&q.dequantize(&Device::Cpu).unwrap());
            let x = Tensor::randn(0f32, 1.0, (1, tokens, cols), &Device::Cpu).unwrap();
            let xs = values(&x);
            for path in Simd::available() {
                let matrix = Matrix::<Halves<H>>::from_qtensor(&q).unwrap().on(path);
                let ours = values(&Linear::Ours(Box::new(matrix)).forward(&x).unwrap());
                for t in 0..tokens {
                    for r in 0..rows {
                        let (mut exact, mut magnitude) = (0f64, 0f64);
                        for (&w, &x) in w[r * cols..][..cols].iter().zip(&xs[t * cols..]) {
                            exact += w as f64 * x as f64;
                            magnitude += (w as f64 * x as f64).abs();
                        }
                        let got = ours[t * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-6 * magnitude.max(1e-3),
                            "{path:?}: {got} vs {exact} ({rows}x{cols}, row {r}, token {t})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn f16_paths_compute_the_exact_product_up_to_f32_rounding() {
        exact::<F16>();
    }

    #[test]
    fn bf16_paths_compute_the_exact_product_up_to_f32_rounding() {
        exact::<Bf16>();
    }
}
