//! Q4_1 weights (per 32 values: f16 scale `d`, f16 minimum `m`, 4-bit quants) times
//! activations quantized to Q8_1 (scale, scale × sum of the quants, 8-bit quants):
//! per block `d_w × d_x × Σ w·x + m_w × s_x`, as ggml's `vec_dot_q4_1_q8_1`.
// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use candle_core::quantized::GgmlDType;
use half::f16;

use super::activations::{ActBlock, Acts};
use super::driver::finish;
use super::matrix::WeightBlock;
use super::BLOCK;

/// One block of 32 weights as stored in the file (20 bytes): scale and minimum as f16
/// bits, 32 nibbles. Kept compact: these blocks are most of a node's memory.
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; 16],
}

impl BlockQ4_1 {
    fn scales(&self) -> (f32, f32) {
        (
            f16::from_bits(self.d).to_f32(),
            f16::from_bits(self.m).to_f32(),
        )
    }

    /// Weight `j` of the block: low nibbles are weights 0..16, high ones 16..32.
    fn weight(&self, j: usize) -> i32 {
        if j < BLOCK / 2 {
            (self.qs[j] & 0x0F) as i32
        } else {
            (self.qs[j - BLOCK / 2] >> 4) as i32
        }
    }
}

impl WeightBlock for BlockQ4_1 {
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BYTES: usize = 20;
    const SUMS: bool = true;

    /// ggml's block_q4_1: f16 d, f16 m, 16 bytes of nibbles.
    fn parse(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[4..20]);
        BlockQ4_1 {
            d: u16::from_le_bytes([b[0], b[1]]),
            m: u16::from_le_bytes([b[2], b[3]]),
            qs,
        }
    }

    fn dequantize(&self, out: &mut Vec<f32>) {
        let (d, m) = self.scales();
        out.extend((0..BLOCK).map(|j| self.weight(j) as f32 * d + m));
    }

    fn dot_portable(row: &[BlockQ4_1], act: &Acts) -> f32 {
        let mut acc = [0f32; 16];
        let mut offsets = [0f32; 2];
        for (b, (x, y)) in row.iter().zip(&act.blocks).enumerate() {
            let (d, m) = x.scales();
            let scale = d * y.d;
            let group = &mut acc[(b % 2) * 8..][..8];
            for (lane, acc) in group.iter_mut().enumerate() {
                let sumi: i32 = (4 * lane..4 * lane + 4)
                    .map(|j| x.weight(j) * y.qs[j] as i32)
                    .sum();
                *acc = scale.mul_add(sumi as f32, *acc);
            }
            offsets[b % 2] = m.mul_add(y.s, offsets[b % 2]);
        }
        finish(acc, offsets[0], offsets[1])
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[BlockQ4_1]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { simd::tile_avx2(rows, acts, out, stride) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[BlockQ4_1]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { simd::tile_avx512(rows, acts, out, stride) }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{ActBlock, Acts, BlockQ4_1};
    use crate::model::kernels::activations::ActPair;
    use crate::model::kernels::driver::finish;

    /// How far ahead of the block in use to prefetch weights, in bytes: decode streams
    /// every weight once per token, and waiting for them was most of its time.
    const PREFETCH: usize = 4096;

    /// The block's 32 weights as bytes (0..16), low nibbles first.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn unpack(x: &BlockQ4_1) -> __m256i {
        let low = _mm_set1_epi8(0x0F);
        _mm_prefetch::<_MM_HINT_T0>(x.qs.as_ptr().wrapping_add(PREFETCH).cast());
        // SAFETY: `qs` is 16 bytes; an unaligned load of exactly that size.
        let packed = unsafe { _mm_loadu_si128(x.qs.as_ptr().cast()) };
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        _mm256_set_m128i(hi, lo)
    }

    /// The block's scale and minimum (exact, as half's to_f32).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn scales(x: &BlockQ4_1) -> (f32, f32) {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((x.d as u32 | (x.m as u32) << 16) as i32));
        (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
    }

    /// Eight lanes, each the exact sum of four adjacent u8 × i8 products.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn lanes(w: __m256i, y: &ActBlock) -> __m256 {
        // SAFETY: `qs` is 32 bytes; an unaligned load of exactly that size.
        let a = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
        // Pairs to i16: at most 2 × 15 × 128, no saturation.
        let pairs = _mm256_maddubs_epi16(w, a);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[BlockQ4_1]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = rows[0].len();
        let rows: [&[BlockQ4_1]; R] = rows.map(|r| &r[..blocks]);
        let acts: [&[ActBlock]; T] = acts.map(|a| &a.blocks[..blocks]);
        // [group][row][token]: group 0 takes even blocks, group 1 odd ones.
        let mut acc = [[[_mm256_setzero_ps(); T]; R]; 2];
        let mut offsets = [[[0f32; T]; R]; 2];
        for b in 0..blocks {
            let g = b % 2;
            let mut w = [_mm256_setzero_si256(); R];
            let mut dm = [(0f32, 0f32); R];
            for r in 0..R {
                w[r] = unpack(&rows[r][b]);
                dm[r] = scales(&rows[r][b]);
            }
            for t in 0..T {
                let y = &acts[t][b];
                for r in 0..R {
                    let scale = _mm256_set1_ps(dm[r].0 * y.d);
                    acc[g][r][t] = _mm256_fmadd_ps(scale, lanes(w[r], y), acc[g][r][t]);
                    offsets[g][r][t] = dm[r].1.mul_add(y.s, offsets[g][r][t]);
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
                out[r * stride + t] = finish(all, offsets[0][r][t], offsets[1][r][t]);
            }
        }
    }

    /// Two blocks per 512-bit vector: the even block in lanes 0..8, the odd one in
    /// 8..16; the same operations per lane as [`tile_avx2`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[BlockQ4_1]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = rows[0].len();
        let pairs = blocks / 2;
        let rows: [&[BlockQ4_1]; R] = rows.map(|r| &r[..blocks]);
        let act_pairs: [&[ActPair]; T] = acts.map(|a| &a.pairs[..pairs]);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut offsets = [[_mm512_setzero_ps(); T]; R];
        let d_index = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        let m_index = _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3);
        for p in 0..pairs {
            let mut w = [_mm512_setzero_si512(); R];
            let mut d = [_mm512_setzero_ps(); R];
            let mut m = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let (x0, x1) = (&rows[r][2 * p], &rows[r][2 * p + 1]);
                w[r] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(unpack(x0)), unpack(x1));
                // d0, m0, d1, m1 as f32 in one conversion, then spread over the halves.
                let bits =
                    (x0.d as i64) | (x0.m as i64) << 16 | (x1.d as i64) << 32 | (x1.m as i64) << 48;
                let dm = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128(bits)));
                d[r] = _mm512_permutexvar_ps(d_index, dm);
                m[r] = _mm512_permutexvar_ps(m_index, dm);
            }
            for t in 0..T {
                let y = &act_pairs[t][p];
                // SAFETY: the pair holds 64 quants and 16-float arrays: unaligned
                // loads of exactly those sizes.
                let (a, dy, sy) = unsafe {
                    (
                        _mm512_loadu_si512(y.qs.as_ptr().cast()),
                        _mm512_loadu_ps(y.d.as_ptr()),
                        _mm512_loadu_ps(y.s.as_ptr()),
                    )
                };
                for r in 0..R {
                    let lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], a);
                    let scale = _mm512_mul_ps(d[r], dy);
                    acc[r][t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(lanes), acc[r][t]);
                    // Lanes 0 and 8 carry the offsets; elsewhere m × 0 + 0 stays 0.
                    offsets[r][t] = _mm512_fmadd_ps(m[r], sy, offsets[r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let mut all = [0f32; 16];
                let mut sums = [0f32; 16];
                // SAFETY: both arrays are 16 floats; unaligned stores of that size.
                unsafe {
                    _mm512_storeu_ps(all.as_mut_ptr(), acc[r][t]);
                    _mm512_storeu_ps(sums.as_mut_ptr(), offsets[r][t]);
                }
                let (mut even_offset, odd_offset) = (sums[0], sums[8]);
                if blocks % 2 == 1 {
                    // The last block is even: continue lanes 0..8 as the AVX2 path does.
                    let b = blocks - 1;
                    let (x, y) = (&rows[r][b], &acts[t].blocks[b]);
                    let (dw, mw) = scales(x);
                    let scale = _mm256_set1_ps(dw * y.d);
                    // SAFETY: unaligned load and store of the first 8 of 16 floats.
                    unsafe {
                        let group = _mm256_loadu_ps(all.as_ptr());
                        let group = _mm256_fmadd_ps(scale, lanes(unpack(x), y), group);
                        _mm256_storeu_ps(all.as_mut_ptr(), group);
                    }
                    even_offset = mw.mul_add(y.s, even_offset);
                }
                out[r * stride + t] = finish(all, even_offset, odd_offset);
            }
        }
    }
}
