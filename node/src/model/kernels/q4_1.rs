//! Q4_1 weights (per 32 values: f16 scale `d`, f16 minimum `m`, 4-bit quants) times
//! activations quantized to Q8_1 (scale, scale × sum of the quants, 8-bit quants):
//! per block `d_w × d_x × Σ w·x + m_w × s_x`, as ggml's `vec_dot_q4_1_q8_1`.
//!
//! Blocks are kept in pairs, their nibbles interleaved at load, so that one 32-byte
//! load and one shift unpack 64 weights.
// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use candle_core::quantized::GgmlDType;
use half::f16;

use super::activations::{ActBlock, Acts};
use super::driver::finish;
use super::matrix::WeightBlock;
use super::BLOCK;

/// Two consecutive blocks of a row (40 bytes, as in the file): the scales and minimums
/// `[d0, m0, d1, m1]` as f16 bits, and byte `j` holding weight `j` of the first block
/// in its low nibble and weight `j` of the second in its high one. An odd last block
/// of a row is paired with a zero block.
#[derive(Clone, Copy, Debug)]
pub struct PairQ4_1 {
    scales: [u16; 4],
    qs: [u8; 32],
}

impl PairQ4_1 {
    /// Scale and minimum of block `k` (0 or 1).
    fn scales(&self, k: usize) -> (f32, f32) {
        (
            f16::from_bits(self.scales[2 * k]).to_f32(),
            f16::from_bits(self.scales[2 * k + 1]).to_f32(),
        )
    }

    /// Weight `j` of block `k`.
    fn weight(&self, k: usize, j: usize) -> i32 {
        ((self.qs[j] >> (4 * k)) & 0x0F) as i32
    }

    /// From ggml's block_q4_1 (f16 d, f16 m, 16 bytes: weights 0..16 in the low
    /// nibbles, 16..32 in the high ones); `second` may be absent (zero block).
    fn from_blocks(first: &[u8], second: Option<&[u8]>) -> Self {
        let weights = |b: &[u8]| -> [u8; 32] {
            std::array::from_fn(|j| match j < 16 {
                true => b[4 + j] & 0x0F,
                false => b[4 + j - 16] >> 4,
            })
        };
        let half = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let (w0, mut w1, mut scales) = (weights(first), [0u8; 32], [0u16; 4]);
        scales[0] = half(first, 0);
        scales[1] = half(first, 2);
        if let Some(b) = second {
            w1 = weights(b);
            scales[2] = half(b, 0);
            scales[3] = half(b, 2);
        }
        PairQ4_1 {
            scales,
            qs: std::array::from_fn(|j| w0[j] | w1[j] << 4),
        }
    }
}

impl WeightBlock for PairQ4_1 {
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BYTES: usize = 20;
    const VALUES: usize = 2 * BLOCK;
    const SUMS: bool = true;

    fn parse_row(bytes: &[u8], out: &mut Vec<Self>) {
        out.extend(bytes.chunks(2 * Self::BYTES).map(|two| {
            let (first, second) = two.split_at(Self::BYTES);
            Self::from_blocks(first, (!second.is_empty()).then_some(second))
        }));
    }

    fn dequantize(&self, out: &mut Vec<f32>) {
        for k in 0..2 {
            let (d, m) = self.scales(k);
            out.extend((0..BLOCK).map(|j| self.weight(k, j) as f32 * d + m));
        }
    }

    fn dot_portable(row: &[PairQ4_1], act: &Acts) -> f32 {
        let mut acc = [0f32; 16];
        let mut offsets = [0f32; 2];
        for (b, y) in act.blocks.iter().enumerate() {
            let (x, k) = (&row[b / 2], b % 2);
            let (d, m) = x.scales(k);
            let scale = d * y.d;
            let group = &mut acc[k * 8..][..8];
            for (lane, acc) in group.iter_mut().enumerate() {
                let sumi: i32 = (4 * lane..4 * lane + 4)
                    .map(|j| x.weight(k, j) * y.qs[j] as i32)
                    .sum();
                *acc = scale.mul_add(sumi as f32, *acc);
            }
            offsets[k] = m.mul_add(y.s, offsets[k]);
        }
        finish(acc, offsets[0], offsets[1])
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[PairQ4_1]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { simd::tile_avx2(rows, acts, out, stride) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[PairQ4_1]; R],
        acts: [&Acts; T],
        sums: &[[f32; 16]],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { simd::tile_avx512(rows, acts, sums, out, stride) }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{ActBlock, Acts, PairQ4_1};
    use crate::model::kernels::activations::ActPair;
    use crate::model::kernels::driver::finish;

    /// How far ahead of the pair in use to prefetch weights, in bytes: decode streams
    /// every weight once per token, and waiting for them was most of its time.
    const PREFETCH: usize = 4096;

    /// The pair's interleaved nibbles (one byte per weight pair), prefetching ahead.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load(x: &PairQ4_1) -> __m256i {
        _mm_prefetch::<_MM_HINT_T0>(x.qs.as_ptr().wrapping_add(PREFETCH).cast());
        // SAFETY: `qs` is 32 bytes; an unaligned load of exactly that size.
        unsafe { _mm256_loadu_si256(x.qs.as_ptr().cast()) }
    }

    /// `[d0, m0, d1, m1]` as f32 (exact, as half's to_f32).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn scales(x: &PairQ4_1) -> __m128 {
        // SAFETY: `scales` is 8 bytes; an unaligned 8-byte load.
        _mm_cvtph_ps(unsafe { _mm_loadl_epi64(x.scales.as_ptr().cast()) })
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
        rows: [&[PairQ4_1]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].blocks.len();
        let rows: [&[PairQ4_1]; R] = rows.map(|r| &r[..blocks.div_ceil(2)]);
        let acts: [&[ActBlock]; T] = acts.map(|a| &a.blocks[..blocks]);
        let low = _mm256_set1_epi8(0x0F);
        // [group][row][token]: group 0 takes even blocks, group 1 odd ones.
        let mut acc = [[[_mm256_setzero_ps(); T]; R]; 2];
        let mut offsets = [[[0f32; T]; R]; 2];
        for b in (0..blocks).step_by(2) {
            let p = b / 2;
            let mut w = [[_mm256_setzero_si256(); 2]; R];
            let mut dm = [[0f32; 4]; R];
            for r in 0..R {
                let x = load(&rows[r][p]);
                w[r] = [
                    _mm256_and_si256(x, low),
                    _mm256_and_si256(_mm256_srli_epi16(x, 4), low),
                ];
                // SAFETY: `dm[r]` is 4 floats; an unaligned store of that size.
                unsafe { _mm_storeu_ps(dm[r].as_mut_ptr(), scales(&rows[r][p])) };
            }
            for g in 0..2.min(blocks - b) {
                for t in 0..T {
                    let y = &acts[t][b + g];
                    for r in 0..R {
                        let (d, m) = (dm[r][2 * g], dm[r][2 * g + 1]);
                        let scale = _mm256_set1_ps(d * y.d);
                        acc[g][r][t] = _mm256_fmadd_ps(scale, lanes(w[r][g], y), acc[g][r][t]);
                        offsets[g][r][t] = m.mul_add(y.s, offsets[g][r][t]);
                    }
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

    /// A pair per 512-bit vector: the even block in lanes 0..8, the odd one in 8..16;
    /// the same operations per lane as [`tile_avx2`]. An odd last block's zero
    /// partner adds exact zeros. The offsets of the whole tile (up to two rows × eight
    /// tokens) take one vector per lane group: lane `8r + t` is row `r`, token `t`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[PairQ4_1]; R],
        acts: [&Acts; T],
        sums: &[[f32; 16]],
        out: &mut [f32],
        stride: usize,
    ) {
        const { assert!(R <= 2 && T <= 8, "tiles are at most 2 rows × 8 tokens") };
        let pairs = acts[0].blocks.len().div_ceil(2);
        let rows: [&[PairQ4_1]; R] = rows.map(|r| &r[..pairs]);
        let act_pairs: [&[ActPair]; T] = acts.map(|a| &a.pairs[..pairs]);
        let sums = &sums[..pairs];
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        // Even and odd blocks' offsets.
        let mut offsets = [_mm512_setzero_ps(); 2];
        let low = _mm512_set1_epi8(0x0F);
        let d_index = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        // From `[d0 m0 d1 m1]` of row 0 then row 1: each row's m0 (m1) over its lanes.
        let m_index = [
            _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5),
            _mm512_setr_epi32(3, 3, 3, 3, 3, 3, 3, 3, 7, 7, 7, 7, 7, 7, 7, 7),
        ];
        for p in 0..pairs {
            let mut w = [_mm512_setzero_si512(); R];
            let mut d = [_mm512_setzero_ps(); R];
            let mut dm = [_mm_setzero_ps(); 2];
            for r in 0..R {
                let x = load(&rows[r][p]);
                let both =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(x), _mm256_srli_epi16(x, 4));
                w[r] = _mm512_and_si512(both, low);
                dm[r] = scales(&rows[r][p]);
                d[r] = _mm512_permutexvar_ps(d_index, _mm512_castps128_ps512(dm[r]));
            }
            let dm = _mm512_castps256_ps512(_mm256_insertf128_ps::<1>(
                _mm256_castps128_ps256(dm[0]),
                dm[1],
            ));
            for (g, offsets) in offsets.iter_mut().enumerate() {
                // SAFETY: 8 of the pair's 16 sums: an unaligned 8-float load.
                let s = unsafe { _mm256_loadu_ps(sums[p].as_ptr().add(8 * g)) };
                let s = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(s)));
                *offsets = _mm512_fmadd_ps(_mm512_permutexvar_ps(m_index[g], dm), s, *offsets);
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
                    let lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], a);
                    let scale = _mm512_mul_ps(d[r], dy);
                    acc[r][t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(lanes), acc[r][t]);
                }
            }
        }
        let mut sums = [[0f32; 16]; 2];
        // SAFETY: both arrays are 16 floats; unaligned stores of that size.
        unsafe {
            _mm512_storeu_ps(sums[0].as_mut_ptr(), offsets[0]);
            _mm512_storeu_ps(sums[1].as_mut_ptr(), offsets[1]);
        }
        for r in 0..R {
            for t in 0..T {
                let mut all = [0f32; 16];
                // SAFETY: `all` is 16 floats; an unaligned store of that size.
                unsafe { _mm512_storeu_ps(all.as_mut_ptr(), acc[r][t]) };
                out[r * stride + t] = finish(all, sums[0][8 * r + t], sums[1][8 * r + t]);
            }
        }
    }
}
