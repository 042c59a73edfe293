//! Q4_1 weights (per 32 values: f16 scale `d`, f16 minimum `m`, 4-bit quants) times
//! activations quantized to Q8_1 (scale, scale × sum of the quants, 8-bit quants):
//! per block `d_w × d_x × Σ w·x + m_w × s_x`, as ggml's `vec_dot_q4_1_q8_1`.
//!
//! Weights are kept in groups of [`GROUP`] rows, one block of each row side by side
//! (the layout of llama.cpp's repacked CPU kernels): 32-bit lane `l` of a vector holds
//! four weights of row `l`, so eight integer multiply-adds (`vpdpbusd`) give all
//! sixteen rows' exact block sums at once, and the float work per block and token is
//! two fused multiply-adds per sixteen rows instead of per row.
//!
//! The arithmetic every path performs, per row and token, for blocks `b` in order
//! (`Σ_b` the block's exact integer sum of products, `acc` starting at zero):
//! `acc = fma(m_w, s_x, acc)`, then `acc = fma(Σ_b × d_x, d_w, acc)` (the product
//! `Σ_b × d_x` rounded to f32 first). The result is `acc`.
// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use crate::model::tensor_type::TensorType;
use half::f16;

use super::activations::{ActBlock, Acts};
use super::matrix::{avx_kernels, neon_kernel, WeightBlock};
use super::BLOCK;

/// Rows per group.
pub const GROUP: usize = 16;

/// One block (32 values) of each of [`GROUP`] rows: their scales and minimums as f16
/// bits, and their quants: byte `64k + 4l + i` holds weight `4k + i` of row `l` in
/// its low nibble and weight `16 + 4k + i` in its high one (`k < 4`, `i < 4`), so that
/// the nibbles of one 64-byte load are four weights of every row. Rows past the
/// matrix's last are zero.
#[derive(Clone, Copy, Debug)]
pub struct GroupQ4_1 {
    d: [u16; GROUP],
    m: [u16; GROUP],
    qs: [u8; 16 * GROUP],
}

impl GroupQ4_1 {
    /// Scale and minimum of row `lane`.
    fn scales(&self, lane: usize) -> (f32, f32) {
        (
            f16::from_bits(self.d[lane]).to_f32(),
            f16::from_bits(self.m[lane]).to_f32(),
        )
    }

    /// Weight `j` of row `lane`.
    fn weight(&self, lane: usize, j: usize) -> i32 {
        let byte = self.qs[64 * (j % 16 / 4) + 4 * lane + j % 4];
        ((byte >> (4 * (j / 16))) & 0x0F) as i32
    }
}

/// Four quants of a token's block (weights `4e..4e + 4`), for every 32-bit lane:
/// one 4-byte load (built byte by byte, it compiled to four loads and shifts).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn quad(y: &ActBlock, e: usize) -> i32 {
    let four = &y.qs[4 * e..4 * e + 4];
    // SAFETY: `four` holds 4 bytes; an unaligned read of exactly those.
    unsafe { four.as_ptr().cast::<i32>().read_unaligned() }
}

/// ggml's block_q4_1: f16 d, f16 m, 16 bytes (weights 0..16 in the low nibbles,
/// 16..32 in the high ones).
const FILE_BLOCK: usize = 20;

impl WeightBlock for GroupQ4_1 {
    const DTYPE: TensorType = TensorType::Q4_1;
    const BYTES: usize = FILE_BLOCK;
    const ROWS: usize = GROUP;
    const SUMS: bool = true;

    fn parse_rows(rows: &[&[u8]], out: &mut Vec<Self>) {
        let blocks = rows.first().map_or(0, |r| r.len() / FILE_BLOCK);
        out.extend((0..blocks).map(|b| {
            let mut group = GroupQ4_1 {
                d: [0; GROUP],
                m: [0; GROUP],
                qs: [0; 16 * GROUP],
            };
            for (lane, row) in rows.iter().enumerate() {
                let x = &row[b * FILE_BLOCK..][..FILE_BLOCK];
                group.d[lane] = u16::from_le_bytes([x[0], x[1]]);
                group.m[lane] = u16::from_le_bytes([x[2], x[3]]);
                for k in 0..4 {
                    group.qs[64 * k + 4 * lane..][..4].copy_from_slice(&x[4 + 4 * k..][..4]);
                }
            }
            group
        }));
    }

    fn dequantize(&self, lane: usize, out: &mut Vec<f32>) {
        let (d, m) = self.scales(lane);
        out.extend((0..BLOCK).map(|j| self.weight(lane, j) as f32 * d + m));
    }

    fn dot_portable(row: &[GroupQ4_1], lane: usize, act: &Acts) -> f32 {
        let mut acc = 0f32;
        for (x, y) in row.iter().zip(&act.blocks) {
            let sum: i32 = (0..BLOCK).map(|j| x.weight(lane, j) * y.qs[j] as i32).sum();
            let (d, m) = x.scales(lane);
            acc = m.mul_add(y.s, acc);
            acc = (sum as f32 * y.d).mul_add(d, acc);
        }
        acc
    }

    /// One token takes a kernel of its own: a whole group's sums in one register.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[GroupQ4_1]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        for (r, group) in rows.into_iter().enumerate() {
            let out = &mut out[r * GROUP..];
            if T == 1 {
                // SAFETY: the caller guarantees the CPU features.
                unsafe { simd::group_avx2(group, acts[0], out) }
                continue;
            }
            for half in 0..2 {
                // SAFETY: the caller guarantees the CPU features.
                unsafe { Self::half_avx2(group, half, acts, &mut out[8 * half..], stride) }
            }
        }
    }

    avx_kernels!(simd::half_avx2, simd::group_avx512);

    neon_kernel!(neon::pass);
}

/// The Advanced SIMD path (every AArch64 CPU; no dot-product extension needed): a
/// 16-byte load of a group's quants holds four weights of four rows, the integer
/// products are widened to 16 bits (`smlal`, exact: a lane sums 8 products of at most
/// 15 × 128) and summed pairwise into each row's exact block sum; then the float
/// operations the module describes, four rows per vector.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{quad, Acts, GroupQ4_1};
    use crate::model::kernels::half_neon::f16x4_to_f32;

    #[target_feature(enable = "neon")]
    pub fn pass<const T: usize>(
        group: &[GroupQ4_1],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].blocks.len();
        let low = vdupq_n_u8(0x0F);
        let mut acc = [[vdupq_n_f32(0.0); 4]; T];
        for (b, x) in group[..blocks].iter().enumerate() {
            // SAFETY: the group's 16 scales, 16 minimums and 256 quant bytes: loads of
            // exactly those sizes.
            let (d, m, raw) = unsafe {
                let scales = |h: &[u16; 16]| {
                    [0, 1, 2, 3].map(|c| f16x4_to_f32(vld1_u16(h.as_ptr().add(4 * c))))
                };
                let raw: [[uint8x16_t; 4]; 4] = std::array::from_fn(|k| {
                    std::array::from_fn(|c| vld1q_u8(x.qs.as_ptr().add(64 * k + 16 * c)))
                });
                (scales(&x.d), scales(&x.m), raw)
            };
            for (t, acc) in acc.iter_mut().enumerate() {
                let y = &acts[t].blocks[b];
                // Per row quad `c`: products of rows 4c, 4c + 1 (low half) and 4c + 2,
                // 4c + 3 (high half), four i16 lanes per row.
                let mut lanes = [[vdupq_n_s16(0); 2]; 4];
                for (k, raw) in raw.iter().enumerate() {
                    let qa = vreinterpretq_s8_s32(vdupq_n_s32(quad(y, k)));
                    let qc = vreinterpretq_s8_s32(vdupq_n_s32(quad(y, k + 4)));
                    for (lanes, &raw) in lanes.iter_mut().zip(raw) {
                        let lo = vreinterpretq_s8_u8(vandq_u8(raw, low));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw));
                        lanes[0] = vmlal_s8(lanes[0], vget_low_s8(lo), vget_low_s8(qa));
                        lanes[0] = vmlal_s8(lanes[0], vget_low_s8(hi), vget_low_s8(qc));
                        lanes[1] = vmlal_high_s8(lanes[1], lo, qa);
                        lanes[1] = vmlal_high_s8(lanes[1], hi, qc);
                    }
                }
                let (s, dy) = (vdupq_n_f32(y.s), vdupq_n_f32(y.d));
                for (c, acc) in acc.iter_mut().enumerate() {
                    // Rows 4c..4c + 4: each row's four lanes summed in pairs, then
                    // the pairs (exact integer sums).
                    let [front, back] = lanes[c];
                    let sum = vpaddq_s32(vpaddlq_s16(front), vpaddlq_s16(back));
                    *acc = vfmaq_f32(*acc, m[c], s);
                    *acc = vfmaq_f32(*acc, vmulq_f32(vcvtq_f32_s32(sum), dy), d[c]);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let out = &mut out[t * stride..][..16];
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

    use super::{quad, ActBlock, Acts, GroupQ4_1, GROUP};
    use crate::model::kernels::driver::{cut_each, prefetch};

    /// Weights `4k..4k + 4` (low nibbles) and `16 + 4k..20 + 4k` (high ones) of rows
    /// `8 × half..8 × half + 8` of a group's block, one row per 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn nibbles(x: &GroupQ4_1, k: usize, half: usize) -> (__m256i, __m256i) {
        let low = _mm256_set1_epi8(0x0F);
        // SAFETY: 32 of the 256 quant bytes; an unaligned load.
        let raw = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(64 * k + 32 * half).cast()) };
        (
            _mm256_and_si256(raw, low),
            _mm256_and_si256(_mm256_srli_epi16(raw, 4), low),
        )
    }

    /// One block of eight rows added to their accumulator: `pairs` holds the block's
    /// products against token `y` as i16 pairs, `half` selects the rows' scales.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn add_block(acc: __m256, pairs: __m256i, x: &GroupQ4_1, half: usize, y: &ActBlock) -> __m256 {
        // SAFETY: 8 of the 16 f16 values each; unaligned 16-byte loads.
        let (d, m) = unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(x.d.as_ptr().add(8 * half).cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(x.m.as_ptr().add(8 * half).cast())),
            )
        };
        let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        let acc = _mm256_fmadd_ps(m, _mm256_set1_ps(y.s), acc);
        let scaled = _mm256_mul_ps(sum, _mm256_set1_ps(y.d));
        _mm256_fmadd_ps(scaled, d, acc)
    }

    /// Eight rows' results of one token into `out[..8]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn store_rows(acc: __m256, out: &mut [f32]) {
        let out = &mut out[..8];
        // SAFETY: `out` holds 8 floats; an unaligned store of that size.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc) };
    }

    /// Rows `8 × half..8 × half + 8` of a group of rows against `T` tokens, one row
    /// per lane, into `out[t * stride + row]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn half_avx2<const T: usize>(
        group: &[GroupQ4_1],
        half: usize,
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].blocks.len();
        let group = &group[..blocks];
        let acts = cut_each(acts, |a| &a.blocks[..blocks]);
        let mut acc = [_mm256_setzero_ps(); T];
        for (b, x) in group.iter().enumerate() {
            prefetch(x);
            // Pairs of products in i16: each lane sums 16 products of at most
            // 15 × 127, so no pair saturates and no sum overflows.
            let mut pairs = [_mm256_setzero_si256(); T];
            for k in 0..4 {
                let (lo, hi) = nibbles(x, k, half);
                for t in 0..T {
                    let y = &acts[t][b];
                    let a = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(quad(y, k)));
                    let c = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(quad(y, k + 4)));
                    pairs[t] = _mm256_add_epi16(pairs[t], _mm256_add_epi16(a, c));
                }
            }
            for t in 0..T {
                acc[t] = add_block(acc[t], pairs[t], x, half, &acts[t][b]);
            }
        }
        for (t, acc) in acc.into_iter().enumerate() {
            store_rows(acc, &mut out[t * stride..]);
        }
    }

    /// All sixteen rows of a group against one token (a decode step), both halves per
    /// block: the token's quants are broadcast once for all rows, and one call covers
    /// the group. The same operations per row as [`half_avx2`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn group_avx2(group: &[GroupQ4_1], act: &Acts, out: &mut [f32]) {
        let blocks = act.blocks.len();
        let mut acc = [_mm256_setzero_ps(); 2];
        for (x, y) in group[..blocks].iter().zip(&act.blocks) {
            prefetch(x);
            let mut pairs = [_mm256_setzero_si256(); 2];
            for k in 0..4 {
                let (qa, qc) = (
                    _mm256_set1_epi32(quad(y, k)),
                    _mm256_set1_epi32(quad(y, k + 4)),
                );
                for (half, pairs) in pairs.iter_mut().enumerate() {
                    let (lo, hi) = nibbles(x, k, half);
                    let a = _mm256_maddubs_epi16(lo, qa);
                    let c = _mm256_maddubs_epi16(hi, qc);
                    *pairs = _mm256_add_epi16(*pairs, _mm256_add_epi16(a, c));
                }
            }
            for (half, acc) in acc.iter_mut().enumerate() {
                *acc = add_block(*acc, pairs[half], x, half, y);
            }
        }
        for (half, acc) in acc.into_iter().enumerate() {
            store_rows(acc, &mut out[8 * half..]);
        }
    }

    /// A group of rows against `T` tokens, one row per lane, into
    /// `out[t * stride + row]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub fn group_avx512<const T: usize>(
        group: &[GroupQ4_1],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].blocks.len();
        let group = &group[..blocks];
        let acts = cut_each(acts, |a| &a.blocks[..blocks]);
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); T];
        for (b, x) in group.iter().enumerate() {
            prefetch(x);
            // SAFETY: the group's 16 scales and minimums and 256 quant bytes: unaligned
            // loads of exactly those sizes.
            let (d, m, raw) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(x.d.as_ptr().cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(x.m.as_ptr().cast())),
                    {
                        let load = |k: usize| _mm512_loadu_si512(x.qs.as_ptr().add(64 * k).cast());
                        [load(0), load(1), load(2), load(3)]
                    },
                )
            };
            // Weights 4e..4e + 4 of every row (e < 8), spelled out rather than through
            // `array::from_fn` (see `cut_each`).
            let lo = |r: __m512i| _mm512_and_si512(r, low);
            let hi = |r: __m512i| _mm512_and_si512(_mm512_srli_epi16(r, 4), low);
            let w: [__m512i; 8] = [
                lo(raw[0]),
                lo(raw[1]),
                lo(raw[2]),
                lo(raw[3]),
                hi(raw[0]),
                hi(raw[1]),
                hi(raw[2]),
                hi(raw[3]),
            ];
            for t in 0..T {
                let y = &acts[t][b];
                let q = |e: usize| _mm512_set1_epi32(quad(y, e));
                // Two chains of exact integer sums, added.
                let mut even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], q(0));
                let mut odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], q(1));
                for e in (2..8).step_by(2) {
                    even = _mm512_dpbusd_epi32(even, w[e], q(e));
                    odd = _mm512_dpbusd_epi32(odd, w[e + 1], q(e + 1));
                }
                let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(y.s), acc[t]);
                let scaled = _mm512_mul_ps(sum, _mm512_set1_ps(y.d));
                acc[t] = _mm512_fmadd_ps(scaled, d, acc[t]);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let out = &mut out[t * stride..][..GROUP];
            // SAFETY: `out` holds 16 floats; an unaligned store of that size.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *acc) };
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

    /// Every path against ggml's per-block formula evaluated in f64 on the same
    /// quantized weights and activations: only f32 rounding may differ.
    #[test]
    fn every_path_computes_the_per_block_formula() {
        for (rows, cols, tokens) in [(48, 576, 3), (40, 1536, 9), (16, 32, 1)] {
            let q = Arc::new(weights(TensorType::Q4_1, rows, cols));
            let bytes = &q.bytes;
            let x = Tensor::randn(0f32, 1.0, (1, tokens, cols), &Device::Cpu).unwrap();
            let xs = values(&x);
            for path in Simd::available() {
                let linear = Linear::Ours(Box::new(
                    Matrix::<GroupQ4_1>::from_stored(&q).unwrap().on(path),
                ));
                let ours = values(&linear.forward(&x).unwrap());
                for t in 0..tokens {
                    let act = Acts::quantize(&xs[t * cols..][..cols], true);
                    for r in 0..rows {
                        // f32 rounding is relative to the terms' magnitudes, not to
                        // their sum, which cancellation can bring near zero.
                        let (mut exact, mut magnitude) = (0f64, 0f64);
                        for (b, y) in act.blocks.iter().enumerate() {
                            let block = &bytes[(r * cols / BLOCK + b) * FILE_BLOCK..];
                            let half = |i: usize| f16::from_le_bytes([block[i], block[i + 1]]);
                            let sum: i64 = (0..BLOCK)
                                .map(|j| {
                                    let w = block[4 + j % 16] >> (4 * (j / 16)) & 0x0F;
                                    w as i64 * y.qs[j] as i64
                                })
                                .sum();
                            let (scaled, offset) = (
                                half(0).to_f64() * y.d as f64 * sum as f64,
                                half(2).to_f64() * y.s as f64,
                            );
                            exact += scaled + offset;
                            magnitude += scaled.abs() + offset.abs();
                        }
                        let got = ours[t * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-5 * magnitude.max(1.0),
                            "{path:?}: {got} vs {exact} ({rows}x{cols}, row {r}, token {t})"
                        );
                    }
                }
            }
        }
    }
}
