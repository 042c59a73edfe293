//! Q8_0 weights (per 32 values: f16 scale, 8-bit quants) times activations quantized
//! to Q8_0, per block `d_w × d_x × Σ w·x`, as ggml's `vec_dot_q8_0_q8_0`. The test
//! model's embedding, and so its tied LM head, is Q8_0: the largest matrix a client
//! multiplies.
//!
//! Weights are kept in groups of [`GROUP`] rows, as the [`grouped`](super::grouped)
//! kernel keeps them: per block, 512 bytes of which 32-bit lane `l` of the `e`-th 64
//! holds weights `4e..4e + 4` of row `l`, stored plus 128 (unsigned), so that
//! `vpdpbusd` multiplies them with the signed activations; the 128 × Σ x this adds is
//! taken off in integers.
//!
//! The arithmetic every path performs, per row and token, for blocks in order (`acc`
//! starting at zero): `S`, the block's exact integer sum `Σ w·x`, then
//! `acc = fma(S × d_x, d_w, acc)`, the product `S × d_x` rounded to f32 first.
//!
//! Any format whose block is an f16 scale times 32 signed 8-bit values
//! ([`Int8Source`]) is kept and computed this way: IQ4_NL ([`super::iq4_nl`]), its
//! values looked up once at load.
// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use std::marker::PhantomData;

use crate::model::tensor_type::TensorType;
use half::f16;

use super::activations::Acts;
use super::matrix::{avx_kernels, neon_kernel, WeightBlock};
use super::BLOCK;

/// Rows per group.
pub const GROUP: usize = 16;

/// A file format whose block is an f16 scale and 32 signed 8-bit values.
pub trait Int8Source: Copy + Send + Sync + 'static {
    const DTYPE: TensorType;
    /// Bytes of one file block.
    const BYTES: usize;
    /// One row's file block: its scale's f16 bits, and its values into `values`.
    fn decode(block: &[u8], values: &mut [i8; BLOCK]) -> u16;
}

/// Q8_0 as its file stores it.
#[derive(Clone, Copy, Debug)]
pub struct Q8_0;

impl Int8Source for Q8_0 {
    const DTYPE: TensorType = TensorType::Q8_0;
    const BYTES: usize = 34;

    /// ggml's block_q8_0: f16 d, 32 signed bytes.
    fn decode(block: &[u8], values: &mut [i8; BLOCK]) -> u16 {
        for (v, &q) in values.iter_mut().zip(&block[2..]) {
            *v = q as i8;
        }
        u16::from_le_bytes([block[0], block[1]])
    }
}

pub type GroupQ8_0 = GroupInt8<Q8_0>;

/// One block (32 values) of each of [`GROUP`] rows: their scales as f16 bits and their
/// values plus 128. Rows past the matrix's last are zero.
#[derive(Clone, Copy, Debug)]
pub struct GroupInt8<S> {
    d: [u16; GROUP],
    qs: [u8; BLOCK * GROUP],
    source: PhantomData<S>,
}

impl<S> GroupInt8<S> {
    /// Weight `j` of row `lane`.
    fn weight(&self, lane: usize, j: usize) -> i32 {
        self.qs[64 * (j / 4) + 4 * lane + j % 4] as i32 - 128
    }
}

impl<S: Int8Source> WeightBlock for GroupInt8<S> {
    const DTYPE: TensorType = S::DTYPE;
    const BYTES: usize = S::BYTES;
    const ROWS: usize = GROUP;
    const SUMS: bool = true;

    fn parse_rows(rows: &[&[u8]], out: &mut Vec<Self>) {
        let blocks = rows.first().map_or(0, |r| r.len() / Self::BYTES);
        let mut values = [0i8; BLOCK];
        out.extend((0..blocks).map(|b| {
            let mut group = GroupInt8 {
                d: [0; GROUP],
                qs: [128; BLOCK * GROUP],
                source: PhantomData,
            };
            for (lane, row) in rows.iter().enumerate() {
                group.d[lane] = S::decode(&row[b * Self::BYTES..][..Self::BYTES], &mut values);
                for (j, &q) in values.iter().enumerate() {
                    group.qs[64 * (j / 4) + 4 * lane + j % 4] = q as u8 ^ 0x80;
                }
            }
            group
        }));
    }

    fn dequantize(&self, lane: usize, out: &mut Vec<f32>) {
        let d = f16::from_bits(self.d[lane]).to_f32();
        out.extend((0..BLOCK).map(|j| self.weight(lane, j) as f32 * d));
    }

    fn dot_portable(row: &[Self], lane: usize, act: &Acts) -> f32 {
        let mut acc = 0f32;
        for (x, y) in row.iter().zip(&act.blocks) {
            let sum: i32 = (0..BLOCK).map(|j| x.weight(lane, j) * y.qs[j] as i32).sum();
            let d = f16::from_bits(x.d[lane]).to_f32();
            acc = (sum as f32 * y.d).mul_add(d, acc);
        }
        acc
    }

    avx_kernels!(simd::half_avx2, simd::group_avx512);

    neon_kernel!(neon::pass);
}

/// The Advanced SIMD path (every AArch64 CPU; no dot-product extension needed): a
/// 16-byte load holds four weights of four rows, signed again; two products per i16
/// lane (`smull`, `smlal`: at most 2 × 128 × 127) are added pairwise into i32
/// (`sadalp`), so each row's block sum is exact.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{Acts, GroupInt8, GROUP};
    use crate::model::kernels::activations::ActBlock;
    use crate::model::kernels::half_neon::f16x4_to_f32;

    /// Token `y`'s quants `4e..4e + 4` in every 32-bit lane.
    #[inline]
    #[target_feature(enable = "neon")]
    fn quad(y: &ActBlock, e: usize) -> int8x16_t {
        let four = &y.qs[4 * e..4 * e + 4];
        // SAFETY: `four` holds 4 bytes; an unaligned read of exactly those.
        let four = unsafe { four.as_ptr().cast::<i32>().read_unaligned() };
        vreinterpretq_s8_s32(vdupq_n_s32(four))
    }

    #[target_feature(enable = "neon")]
    pub fn pass<S, const T: usize>(
        group: &[GroupInt8<S>],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].blocks.len();
        let flip = vdupq_n_u8(0x80);
        let mut acc = [[vdupq_n_f32(0.0); 4]; T];
        for (b, x) in group[..blocks].iter().enumerate() {
            // SAFETY: 4 of the group's 16 scales per load.
            let d: [float32x4_t; 4] =
                std::array::from_fn(|c| f16x4_to_f32(unsafe { vld1_u16(x.d.as_ptr().add(4 * c)) }));
            for (c, &d) in d.iter().enumerate() {
                // Rows 4c..4c + 4: weights 4e..4e + 4 of each in `w[e]`.
                let w: [int8x16_t; 8] = std::array::from_fn(|e| {
                    // SAFETY: 16 of the group's 512 quant bytes.
                    let raw = unsafe { vld1q_u8(x.qs.as_ptr().add(64 * e + 16 * c)) };
                    vreinterpretq_s8_u8(veorq_u8(raw, flip))
                });
                for (t, acc) in acc.iter_mut().enumerate() {
                    let y = &acts[t].blocks[b];
                    // Rows 4c and 4c + 1 in `front`, 4c + 2 and 4c + 3 in `back`.
                    let (mut front, mut back) = (vdupq_n_s32(0), vdupq_n_s32(0));
                    for e in (0..8).step_by(2) {
                        let (qa, qb) = (quad(y, e), quad(y, e + 1));
                        let lo = vmull_s8(vget_low_s8(w[e]), vget_low_s8(qa));
                        let lo = vmlal_s8(lo, vget_low_s8(w[e + 1]), vget_low_s8(qb));
                        let hi = vmlal_high_s8(vmull_high_s8(w[e], qa), w[e + 1], qb);
                        front = vpadalq_s16(front, lo);
                        back = vpadalq_s16(back, hi);
                    }
                    let s = vpaddq_s32(front, back);
                    let scaled = vmulq_f32(vcvtq_f32_s32(s), vdupq_n_f32(y.d));
                    acc[c] = vfmaq_f32(acc[c], scaled, d);
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

    use super::{Acts, GroupInt8, GROUP};
    use crate::model::kernels::activations::ActBlock;
    use crate::model::kernels::driver::{cut_each, prefetch};

    /// Four quants of a token's block (values `4e..4e + 4`) as one 32-bit lane.
    #[inline(always)]
    fn quad(y: &ActBlock, e: usize) -> i32 {
        let four = &y.qs[4 * e..4 * e + 4];
        // SAFETY: `four` holds 4 bytes; an unaligned read of exactly those.
        unsafe { four.as_ptr().cast::<i32>().read_unaligned() }
    }

    /// A group of rows against `T` tokens, one row per lane, into
    /// `out[t * stride + row]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub fn group_avx512<S, const T: usize>(
        group: &[GroupInt8<S>],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].blocks.len();
        let group = &group[..blocks];
        let acts = cut_each(acts, |a| &a.blocks[..blocks]);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); T];
        for (b, x) in group.iter().enumerate() {
            prefetch(x);
            // SAFETY: the group's 16 scales and 512 quant bytes: unaligned loads of
            // exactly those sizes.
            let (d, w) = unsafe {
                let load = |e: usize| _mm512_loadu_si512(x.qs.as_ptr().add(64 * e).cast());
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(x.d.as_ptr().cast())),
                    [
                        load(0),
                        load(1),
                        load(2),
                        load(3),
                        load(4),
                        load(5),
                        load(6),
                        load(7),
                    ],
                )
            };
            for t in 0..T {
                let y = &acts[t][b];
                let q = |e: usize| _mm512_set1_epi32(quad(y, e));
                // Two chains of exact integer sums, added, less the 128 × Σ x that
                // the stored offset adds.
                let mut a = _mm512_dpbusd_epi32(zero, w[0], q(0));
                let mut c = _mm512_dpbusd_epi32(zero, w[4], q(4));
                for e in 1..4 {
                    a = _mm512_dpbusd_epi32(a, w[e], q(e));
                    c = _mm512_dpbusd_epi32(c, w[e + 4], q(e + 4));
                }
                let offset = _mm512_set1_epi32(128 * y.sum);
                let s = _mm512_sub_epi32(_mm512_add_epi32(a, c), offset);
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(y.d));
                acc[t] = _mm512_fmadd_ps(scaled, d, acc[t]);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let out = &mut out[t * stride..][..GROUP];
            // SAFETY: `out` holds 16 floats; an unaligned store of that size.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *acc) };
        }
    }

    /// Rows `8 × half..8 × half + 8` of a group against `T` tokens, one row per lane,
    /// into `out[t * stride + row]`: the weights signed again and multiplied as
    /// `|w| × (x with w's sign)` (`vpmaddubsw`; a pair is at most 2 × 128 × 127).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn half_avx2<S, const T: usize>(
        group: &[GroupInt8<S>],
        half: usize,
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let blocks = acts[0].blocks.len();
        let group = &group[..blocks];
        let acts = cut_each(acts, |a| &a.blocks[..blocks]);
        let (ones, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(i8::MIN));
        let mut acc = [_mm256_setzero_ps(); T];
        for (b, x) in group.iter().enumerate() {
            prefetch(x);
            // SAFETY: 8 of the 16 scales and 32 of each 64 quant bytes: unaligned
            // loads.
            let (d, w) = unsafe {
                let load = |e: usize| {
                    let raw = _mm256_loadu_si256(x.qs.as_ptr().add(64 * e + 32 * half).cast());
                    _mm256_xor_si256(raw, flip)
                };
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(x.d.as_ptr().add(8 * half).cast())),
                    [
                        load(0),
                        load(1),
                        load(2),
                        load(3),
                        load(4),
                        load(5),
                        load(6),
                        load(7),
                    ],
                )
            };
            let abs = w.map(|w| _mm256_abs_epi8(w));
            for t in 0..T {
                let y = &acts[t][b];
                let mut s = _mm256_setzero_si256();
                for e in 0..8 {
                    let signed = _mm256_sign_epi8(_mm256_set1_epi32(quad(y, e)), w[e]);
                    let pairs = _mm256_maddubs_epi16(abs[e], signed);
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(pairs, ones));
                }
                let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(y.d));
                acc[t] = _mm256_fmadd_ps(scaled, d, acc[t]);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let out = &mut out[t * stride..][..8];
            // SAFETY: `out` holds 8 floats; an unaligned store of that size.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *acc) };
        }
    }
}
