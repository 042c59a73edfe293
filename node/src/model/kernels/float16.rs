//! F16 and BF16 weights, kept in their 16 bits, times the activations as they are
//! (f32, not quantized; llama.cpp rounds them to 16 bits first). Widening a 16-bit
//! float to f32 is exact, so every product is the f32 fused multiply-add of the
//! file's weight and the activation.
//!
//! Weights are kept in groups of [`GROUP`] rows, a column of the group per vector,
//! so that each product is one lane's fused multiply-add and no lanes are summed.
//!
//! The arithmetic every path performs, per row and token: `acc = fma(w_j, x_j, acc)`
//! for every value `j` of the row in order, `acc` starting at zero.

// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use std::marker::PhantomData;

use crate::model::tensor_type::TensorType;

use super::activations::Acts;
use super::matrix::{avx_kernels, neon_kernel, WeightBlock};
use super::BLOCK;

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// A 16-bit float format: how its bits widen to f32.
pub trait HalfFloat: Copy + Send + Sync + 'static {
    const DTYPE: TensorType;
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
    /// Four values at `p` widened.
    ///
    /// # Safety
    /// `p` must point to 4 values; the CPU must support Advanced SIMD.
    #[cfg(target_arch = "aarch64")]
    unsafe fn wide_neon(p: *const u16) -> float32x4_t;
}

/// IEEE half precision.
#[derive(Clone, Copy)]
pub struct F16;

impl HalfFloat for F16 {
    const DTYPE: TensorType = TensorType::F16;

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

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn wide_neon(p: *const u16) -> float32x4_t {
        // SAFETY: the caller's guarantees.
        unsafe { super::half_neon::f16x4_to_f32(vld1_u16(p)) }
    }
}

/// bfloat16: the upper half of an f32.
#[derive(Clone, Copy)]
pub struct Bf16;

impl HalfFloat for Bf16 {
    const DTYPE: TensorType = TensorType::BF16;

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

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn wide_neon(p: *const u16) -> float32x4_t {
        // SAFETY: the caller's guarantees.
        unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p))) }
    }
}

/// Rows per group.
pub const GROUP: usize = 16;

/// 32 columns of each of [`GROUP`] rows: `w[j][lane]` is value `j` of row `lane`, so
/// that one vector holds a column of the group. Rows past the matrix's last are zero.
#[derive(Clone, Copy)]
pub struct Halves<H> {
    w: [[u16; GROUP]; BLOCK],
    format: PhantomData<H>,
}

pub type BlockF16 = Halves<F16>;
pub type BlockBf16 = Halves<Bf16>;

impl<H: HalfFloat> WeightBlock for Halves<H> {
    const DTYPE: TensorType = H::DTYPE;
    const BYTES: usize = 2 * BLOCK;
    const ROWS: usize = GROUP;
    const SUMS: bool = false;
    const FLOAT: bool = true;

    fn parse_rows(rows: &[&[u8]], out: &mut Vec<Self>) {
        let blocks = rows.first().map_or(0, |r| r.len() / Self::BYTES);
        out.extend((0..blocks).map(|b| {
            let mut group = Halves {
                w: [[0; GROUP]; BLOCK],
                format: PhantomData,
            };
            for (lane, row) in rows.iter().enumerate() {
                let x = &row[b * Self::BYTES..][..Self::BYTES];
                for (j, two) in x.chunks_exact(2).enumerate() {
                    group.w[j][lane] = u16::from_le_bytes([two[0], two[1]]);
                }
            }
            group
        }));
    }

    fn dequantize(&self, lane: usize, out: &mut Vec<f32>) {
        out.extend(self.w.iter().map(|column| H::to_f32(column[lane])));
    }

    fn dot_portable(row: &[Self], lane: usize, act: &Acts) -> f32 {
        let mut acc = 0f32;
        for (x, ys) in row.iter().zip(act.values.chunks_exact(BLOCK)) {
            for (column, &y) in x.w.iter().zip(ys) {
                acc = H::to_f32(column[lane]).mul_add(y, acc);
            }
        }
        acc
    }

    avx_kernels!(simd::half_avx2, simd::group_avx512);

    neon_kernel!(neon::pass);
}

/// The Advanced SIMD path: a column of the group in four vectors, each widened once
/// for several tokens.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{Acts, HalfFloat, Halves, BLOCK, GROUP};

    #[target_feature(enable = "neon")]
    pub fn pass<H: HalfFloat, const T: usize>(
        group: &[Halves<H>],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].values.len() / BLOCK;
        let mut acc = [[vdupq_n_f32(0.0); 4]; T];
        for (b, x) in group[..blocks].iter().enumerate() {
            for (j, column) in x.w.iter().enumerate() {
                // SAFETY: 4 of the column's 16 values per load.
                let w: [float32x4_t; 4] =
                    std::array::from_fn(|c| unsafe { H::wide_neon(column.as_ptr().add(4 * c)) });
                for (t, acc) in acc.iter_mut().enumerate() {
                    let y = vdupq_n_f32(acts[t].values[b * BLOCK + j]);
                    for (acc, &w) in acc.iter_mut().zip(&w) {
                        *acc = vfmaq_f32(*acc, w, y);
                    }
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let out = &mut out[t * stride..][..GROUP];
            for (c, acc) in acc.iter().enumerate() {
                // SAFETY: `out` holds 16 floats; a store of 4 of them.
                unsafe { vst1q_f32(out.as_mut_ptr().add(4 * c), *acc) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Acts, HalfFloat, Halves, BLOCK, GROUP};
    use crate::model::kernels::driver::{cut_each, prefetch};

    /// A group of rows against `T` tokens, one row per lane, into
    /// `out[t * stride + row]`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub fn group_avx512<H: HalfFloat, const T: usize>(
        group: &[Halves<H>],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].values.len() / BLOCK;
        let group = &group[..blocks];
        let xs = cut_each(acts, |a| &a.values[..blocks * BLOCK]);
        let mut acc = [_mm512_setzero_ps(); T];
        for (b, x) in group.iter().enumerate() {
            prefetch(x);
            for (j, column) in x.w.iter().enumerate() {
                // SAFETY: the column's 16 values.
                let w = unsafe { H::wide512(column.as_ptr()) };
                for t in 0..T {
                    let y = _mm512_set1_ps(xs[t][b * BLOCK + j]);
                    acc[t] = _mm512_fmadd_ps(w, y, acc[t]);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let out = &mut out[t * stride..][..GROUP];
            // SAFETY: `out` holds 16 floats; an unaligned store of that size.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *acc) };
        }
    }

    /// Rows `8 × half..8 × half + 8` of a group against `T` tokens, one row per lane,
    /// into `out[t * stride + row]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn half_avx2<H: HalfFloat, const T: usize>(
        group: &[Halves<H>],
        half: usize,
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].values.len() / BLOCK;
        let group = &group[..blocks];
        let xs = cut_each(acts, |a| &a.values[..blocks * BLOCK]);
        let mut acc = [_mm256_setzero_ps(); T];
        for (b, x) in group.iter().enumerate() {
            prefetch(x);
            for (j, column) in x.w.iter().enumerate() {
                // SAFETY: 8 of the column's 16 values.
                let w = unsafe { H::wide256(column.as_ptr().add(8 * half)) };
                for t in 0..T {
                    let y = _mm256_set1_ps(xs[t][b * BLOCK + j]);
                    acc[t] = _mm256_fmadd_ps(w, y, acc[t]);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let out = &mut out[t * stride..][..8];
            // SAFETY: `out` holds 8 floats; an unaligned store of that size.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *acc) };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::kernels::tests::{dequantized, values, weights};
    use crate::model::kernels::{Linear, Matrix, Simd};

    /// Every path against the exact product of the file's weights and the
    /// activations: only f32 rounding of the running sum may differ.
    fn exact<H: HalfFloat>() {
        for (rows, cols, tokens) in [(33, 576, 3), (8, 2048, 9), (2, 32, 1)] {
            let q = Arc::new(weights(H::DTYPE, rows, cols));
            let w = dequantized(&q);
            let x = Tensor::randn(0f32, 1.0, (1, tokens, cols), &Device::Cpu).unwrap();
            let xs = values(&x);
            for path in Simd::available() {
                let matrix = Matrix::<Halves<H>>::from_stored(&q).unwrap().on(path);
                let ours = values(&Linear::Ours(Box::new(matrix)).forward(&x).unwrap());
                for t in 0..tokens {
                    for r in 0..rows {
                        let (mut exact, mut magnitude) = (0f64, 0f64);
                        for (&w, &x) in w[r * cols..][..cols].iter().zip(&xs[t * cols..]) {
                            exact += w as f64 * x as f64;
                            magnitude += (w as f64 * x as f64).abs();
                        }
                        let got = ours[t * rows + r] as f64;
                        // Recursive summation's bound: n unit roundoffs of the terms'
                        // magnitude (fused products add no rounding of their own).
                        let bound = cols as f64 * f64::powi(2.0, -24) * magnitude;
                        assert!(
                            (got - exact).abs() <= bound.max(1e-9),
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
