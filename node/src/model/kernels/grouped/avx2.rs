//! The AVX2 path: half a group (eight rows) per vector, the integer sums by
//! `vpmaddubsw` (pairs of products in i16: at most 2 × 63 × 128, and two such pairs
//! added stay within i16) and `vpmaddwd` to i32.

use std::arch::x86_64::*;

use super::{act_sum, offsets, prefetch, quad, Format, Group, ScaleSet};
use crate::model::kernels::activations::Acts;
use crate::model::kernels::driver::cut_each;

/// The sub-block's quants of rows `8 × half..8 × half + 8`: weights `4e..4e + 4` of
/// every row in `w[e]`.
#[inline]
#[target_feature(enable = "avx2")]
fn weights<F: Format, const SUB: usize, const PLANES: usize>(
    x: &Group<F, SUB, PLANES>,
    sub: usize,
    half: usize,
) -> [__m256i; 8] {
    let low = _mm256_set1_epi8(0x0F);
    // SAFETY: 32 of the sub-block's 256 quant bytes; unaligned loads.
    let load =
        |k: usize| unsafe { _mm256_loadu_si256(x.qs[sub].as_ptr().add(64 * k + 32 * half).cast()) };
    let raw = [load(0), load(1), load(2), load(3)];
    let lo = |r: __m256i| _mm256_and_si256(r, low);
    let hi = |r: __m256i| _mm256_and_si256(_mm256_srli_epi16(r, 4), low);
    let mut w = [
        lo(raw[0]),
        lo(raw[1]),
        lo(raw[2]),
        lo(raw[3]),
        hi(raw[0]),
        hi(raw[1]),
        hi(raw[2]),
        hi(raw[3]),
    ];
    for (p, plane) in x.planes[sub].iter().enumerate() {
        // SAFETY: 32 of the plane's 64 bytes; an unaligned load.
        let plane = unsafe { _mm256_loadu_si256(plane.as_ptr().add(32 * half).cast()) };
        let bit = _mm256_set1_epi8(0x10 << p);
        for (e, w) in w.iter_mut().enumerate() {
            // As the AVX-512 path moves them.
            let shift = 4 + p as i64 - e as i64;
            let moved = match shift >= 0 {
                true => _mm256_sll_epi16(plane, _mm_set_epi64x(0, shift)),
                false => _mm256_srl_epi16(plane, _mm_set_epi64x(0, -shift)),
            };
            *w = _mm256_or_si256(*w, _mm256_and_si256(moved, bit));
        }
    }
    w
}

/// Rows `8 × half..8 × half + 8` of a group against `T` tokens, one row per lane,
/// into `out[t * stride + row]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub fn half<F: Format, const SUB: usize, const PLANES: usize, const T: usize>(
    units: &[Group<F, SUB, PLANES>],
    half: usize,
    acts: [&Acts; T],
    out: &mut [f32],
    stride: usize,
) {
    let blocks = acts[0].blocks.len();
    let units = &units[..blocks / SUB];
    let acts = cut_each(acts, |a| &a.blocks[..blocks]);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    for (u, x) in units.iter().enumerate() {
        for sub in 0..SUB {
            prefetch(x, sub);
            // SAFETY: the caller guarantees the CPU features.
            let (d, m, split) = unsafe { x.scales.avx2(sub, half) };
            let w = weights(x, sub, half);
            for t in 0..T {
                let y = &acts[t][u * SUB + sub];
                let pair = |e: usize| {
                    let q = |e: usize| _mm256_set1_epi32(quad(y, e));
                    let two = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w[e], q(e)),
                        _mm256_maddubs_epi16(w[e + 1], q(e + 1)),
                    );
                    _mm256_madd_epi16(two, ones)
                };
                let mut a = _mm256_add_epi32(pair(0), pair(2));
                let mut b = _mm256_add_epi32(pair(4), pair(6));
                if F::OFFSET != 0 {
                    let [oa, ob] = offsets::<F>(y);
                    a = _mm256_sub_epi32(a, _mm256_set1_epi32(oa));
                    b = _mm256_sub_epi32(b, _mm256_set1_epi32(ob));
                }
                let s = match F::Scales::SPLIT {
                    true => _mm256_add_epi32(
                        _mm256_mullo_epi32(a, split[0]),
                        _mm256_mullo_epi32(b, split[1]),
                    ),
                    false => _mm256_add_epi32(a, b),
                };
                if F::Scales::MINS {
                    acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(act_sum(y)), acc[t]);
                }
                let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(y.d));
                acc[t] = _mm256_fmadd_ps(scaled, d, acc[t]);
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        let out = &mut out[t * stride..][..8];
        // SAFETY: `out` holds 8 floats; an unaligned store of that size.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *acc) };
    }
}
