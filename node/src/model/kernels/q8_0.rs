//! Q8_0 weights (per 32 values: f16 scale, 8-bit quants) times activations quantized
//! to Q8_0: per block `d_w × d_x × Σ w·x`, as ggml's `vec_dot_q8_0_q8_0`. The test
//! model's embedding, and so its tied LM head, is Q8_0: the largest matrix a client
//! multiplies.
//!
//! The arithmetic every path performs, per row and token: block `b` adds to one of two
//! groups of eight f32 lanes (`b % 2`); lane `l` of a block is the exact integer sum of
//! its products `4l..4l + 4`, added as `acc = fma(d_w × d_x, lane, acc)`;
//! [`super::driver::finish`] adds the groups in a fixed order.
// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use candle_core::quantized::GgmlDType;
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::activations::ActBlock;
use super::activations::Acts;
use super::driver::finish;
use super::matrix::WeightBlock;

/// One block of 32 weights as stored in the file (34 bytes): f16 scale bits, quants.
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    d: u16,
    qs: [i8; 32],
}

impl WeightBlock for BlockQ8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BYTES: usize = 34;
    const ROWS: usize = 1;
    const PAIRS: bool = true;
    const SUMS: bool = false;

    /// ggml's block_q8_0: f16 d, 32 signed bytes; kept as they are.
    fn parse_rows(rows: &[&[u8]], out: &mut Vec<Self>) {
        let bytes = rows.first().copied().unwrap_or_default();
        out.extend(bytes.chunks_exact(Self::BYTES).map(|b| {
            let mut qs = [0i8; 32];
            for (q, &byte) in qs.iter_mut().zip(&b[2..34]) {
                *q = byte as i8;
            }
            BlockQ8_0 {
                d: u16::from_le_bytes([b[0], b[1]]),
                qs,
            }
        }));
    }

    fn dequantize(&self, _lane: usize, out: &mut Vec<f32>) {
        let d = f16::from_bits(self.d).to_f32();
        out.extend(self.qs.iter().map(|&q| q as f32 * d));
    }

    fn dot_portable(row: &[BlockQ8_0], _lane: usize, act: &Acts) -> f32 {
        let mut acc = [0f32; 16];
        for (b, (x, y)) in row.iter().zip(&act.blocks).enumerate() {
            let scale = f16::from_bits(x.d).to_f32() * y.d;
            let group = &mut acc[(b % 2) * 8..][..8];
            for (lane, acc) in group.iter_mut().enumerate() {
                let sumi: i32 = (4 * lane..4 * lane + 4)
                    .map(|j| x.qs[j] as i32 * y.qs[j] as i32)
                    .sum();
                *acc = scale.mul_add(sumi as f32, *acc);
            }
        }
        finish(acc, 0.0, 0.0)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[BlockQ8_0]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { simd::tile_avx2(rows, acts, out, stride) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[BlockQ8_0]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { simd::tile_avx512(rows, acts, out, stride) }
    }

    #[cfg(target_arch = "aarch64")]
    unsafe fn tile_neon<const R: usize>(
        rows: [&[BlockQ8_0]; R],
        acts: &[Acts],
        out: &mut [f32],
        stride: usize,
    ) {
        for (r, row) in rows.into_iter().enumerate() {
            for (t, act) in acts.iter().enumerate() {
                // SAFETY: the caller guarantees the CPU features.
                out[t * stride + r] = unsafe { neon::dot(row, act) };
            }
        }
    }
}

/// The Advanced SIMD path: each lane's four products widened to 16 bits (`smull`,
/// exact) and summed pairwise, then the float operations the module describes, four
/// lanes per vector.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use half::f16;

    use super::{Acts, BlockQ8_0};
    use crate::model::kernels::driver::finish;

    /// Lanes `0..4` of a block's sums: products `4l..4l + 4` of 16 quants each.
    #[inline]
    #[target_feature(enable = "neon")]
    fn lane_sums(a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let low = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
        vpaddq_s32(low, vpaddlq_s16(vmull_high_s8(a, b)))
    }

    /// One row against one token.
    #[target_feature(enable = "neon")]
    pub fn dot(row: &[BlockQ8_0], act: &Acts) -> f32 {
        // Groups of eight lanes (block parity) as two vectors each.
        let mut acc = [vdupq_n_f32(0.0); 4];
        for (b, (x, y)) in row.iter().zip(&act.blocks).enumerate() {
            let scale = vdupq_n_f32(f16::from_bits(x.d).to_f32() * y.d);
            // SAFETY: 32 quants each; loads of 16 of them.
            let (x0, x1, y0, y1) = unsafe {
                (
                    vld1q_s8(x.qs.as_ptr()),
                    vld1q_s8(x.qs.as_ptr().add(16)),
                    vld1q_s8(y.qs.as_ptr()),
                    vld1q_s8(y.qs.as_ptr().add(16)),
                )
            };
            let g = (b % 2) * 2;
            acc[g] = vfmaq_f32(acc[g], scale, vcvtq_f32_s32(lane_sums(x0, y0)));
            acc[g + 1] = vfmaq_f32(acc[g + 1], scale, vcvtq_f32_s32(lane_sums(x1, y1)));
        }
        let mut lanes = [0f32; 16];
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: `lanes` holds 16 floats; a store of 4 of them.
            unsafe { vst1q_f32(lanes.as_mut_ptr().add(4 * i), *acc) };
        }
        finish(lanes, 0.0, 0.0)
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{ActBlock, Acts, BlockQ8_0};
    use crate::model::kernels::driver::cut_each;
    use crate::model::kernels::driver::finish;

    /// How far ahead of the block in use to prefetch weights, in bytes.
    const PREFETCH: usize = 4096;

    /// The block's quants.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load(x: &BlockQ8_0) -> __m256i {
        _mm_prefetch::<_MM_HINT_T0>(x.qs.as_ptr().wrapping_add(PREFETCH).cast());
        // SAFETY: `qs` is 32 bytes; an unaligned load of exactly that size.
        unsafe { _mm256_loadu_si256(x.qs.as_ptr().cast()) }
    }

    /// The block's scale (exact, as half's to_f32).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn scale(x: &BlockQ8_0) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x.d as i32)))
    }

    /// Eight lanes, each the exact sum of four adjacent i8 × i8 products.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn lanes(w: __m256i, y: &ActBlock) -> __m256 {
        // SAFETY: `qs` is 32 bytes; an unaligned load of exactly that size.
        let a = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
        // |w| × (a with w's sign) = w × a; pairs to i16: at most 2 × 128 × 127.
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[BlockQ8_0]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = rows[0].len();
        let rows = cut_each(rows, |r| &r[..blocks]);
        let acts = cut_each(acts, |a| &a.blocks[..blocks]);
        // [group][row][token]: group 0 takes even blocks, group 1 odd ones.
        let mut acc = [[[_mm256_setzero_ps(); T]; R]; 2];
        for b in 0..blocks {
            let g = b % 2;
            let mut w = [_mm256_setzero_si256(); R];
            let mut d = [0f32; R];
            for r in 0..R {
                w[r] = load(&rows[r][b]);
                d[r] = scale(&rows[r][b]);
            }
            for t in 0..T {
                let y = &acts[t][b];
                for r in 0..R {
                    let s = _mm256_set1_ps(d[r] * y.d);
                    acc[g][r][t] = _mm256_fmadd_ps(s, lanes(w[r], y), acc[g][r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let mut all = [0f32; 16];
                // SAFETY: `all` is 16 floats; two unaligned 8-float stores into it.
                unsafe {
                    _mm256_storeu_ps(all.as_mut_ptr(), acc[0][r][t]);
                    _mm256_storeu_ps(all.as_mut_ptr().add(8), acc[1][r][t]);
                }
                out[t * stride + r] = finish(all, 0.0, 0.0);
            }
        }
    }

    /// Two blocks per 512-bit vector: the even block in lanes 0..8, the odd one in
    /// 8..16; the same operations per lane as [`tile_avx2`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[BlockQ8_0]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = rows[0].len();
        let pairs = blocks / 2;
        let rows = cut_each(rows, |r| &r[..blocks]);
        let act_pairs = cut_each(acts, |a| &a.pairs[..pairs]);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let d_index = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        for p in 0..pairs {
            let mut abs = [_mm512_setzero_si512(); R];
            let mut negative = [0 as __mmask64; R];
            let mut d = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let (x0, x1) = (&rows[r][2 * p], &rows[r][2 * p + 1]);
                let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load(x0)), load(x1));
                abs[r] = _mm512_abs_epi8(w);
                negative[r] = _mm512_movepi8_mask(w);
                let bits = (x0.d as i32) | (x1.d as i32) << 16;
                let both = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
                d[r] = _mm512_permutexvar_ps(d_index, both);
            }
            for t in 0..T {
                let y = &act_pairs[t][p];
                // SAFETY: the pair holds 64 quants and 16 scales: unaligned loads of
                // exactly those sizes.
                let (a, dy) = unsafe {
                    (
                        _mm512_loadu_si512(y.qs.as_ptr().cast()),
                        _mm512_loadu_ps(y.d.as_ptr()),
                    )
                };
                for r in 0..R {
                    // |w| × (a negated where w < 0) = w × a, summed exactly in i32.
                    let signed = _mm512_mask_sub_epi8(a, negative[r], _mm512_setzero_si512(), a);
                    let lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), abs[r], signed);
                    let s = _mm512_mul_ps(d[r], dy);
                    acc[r][t] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(lanes), acc[r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let mut all = [0f32; 16];
                // SAFETY: `all` is 16 floats; an unaligned store of that size.
                unsafe { _mm512_storeu_ps(all.as_mut_ptr(), acc[r][t]) };
                if blocks % 2 == 1 {
                    // The last block is even: continue lanes 0..8 as the AVX2 path does.
                    let b = blocks - 1;
                    let (x, y) = (&rows[r][b], &acts[t].blocks[b]);
                    let s = _mm256_set1_ps(scale(x) * y.d);
                    // SAFETY: unaligned load and store of the first 8 of 16 floats.
                    unsafe {
                        let group = _mm256_loadu_ps(all.as_ptr());
                        let group = _mm256_fmadd_ps(s, lanes(load(x), y), group);
                        _mm256_storeu_ps(all.as_mut_ptr(), group);
                    }
                }
                out[t * stride + r] = finish(all, 0.0, 0.0);
            }
        }
    }
}
