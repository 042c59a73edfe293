//! The AVX-512 path: a group's sixteen rows in the lanes of one vector, the integer
//! sums by `vpdpbusd` (unsigned quants times signed activations, exact in i32).

use std::arch::x86_64::*;

use super::{act_sum, offsets, prefetch, quad, Format, Group, ScaleSet, GROUP};
use crate::model::kernels::activations::Acts;
use crate::model::kernels::driver::cut_each;

/// The sub-block's quants: weights `4e..4e + 4` of every row in `w[e]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn weights<F: Format, const SUB: usize, const PLANES: usize>(
    x: &Group<F, SUB, PLANES>,
    sub: usize,
) -> [__m512i; 8] {
    let low = _mm512_set1_epi8(0x0F);
    // SAFETY: 64 of the sub-block's 256 quant bytes; unaligned loads.
    let load = |k: usize| unsafe { _mm512_loadu_si512(x.qs[sub].as_ptr().add(64 * k).cast()) };
    let raw = [load(0), load(1), load(2), load(3)];
    let lo = |r: __m512i| _mm512_and_si512(r, low);
    let hi = |r: __m512i| _mm512_and_si512(_mm512_srli_epi16(r, 4), low);
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
        // SAFETY: the plane's 64 bytes; an unaligned load of exactly those.
        let plane = unsafe { _mm512_loadu_si512(plane.as_ptr().cast()) };
        let bit = _mm512_set1_epi8(0x10 << p);
        for (e, w) in w.iter_mut().enumerate() {
            // Bit `e` of each byte to bit `4 + p`; 16-bit shifts carry nothing across
            // bytes into the bit kept.
            let shift = 4 + p as i64 - e as i64;
            let moved = match shift >= 0 {
                true => _mm512_sll_epi16(plane, _mm_set_epi64x(0, shift)),
                false => _mm512_srl_epi16(plane, _mm_set_epi64x(0, -shift)),
            };
            *w = _mm512_or_si512(*w, _mm512_and_si512(moved, bit));
        }
    }
    w
}

/// A group of rows against `T` tokens, one row per lane, into `out[t * stride + row]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub fn group<F: Format, const SUB: usize, const PLANES: usize, const T: usize>(
    units: &[Group<F, SUB, PLANES>],
    acts: [&Acts; T],
    out: &mut [f32],
    stride: usize,
) {
    let blocks = acts[0].blocks.len();
    let units = &units[..blocks / SUB];
    let acts = cut_each(acts, |a| &a.blocks[..blocks]);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); T];
    for (u, x) in units.iter().enumerate() {
        for sub in 0..SUB {
            prefetch(x, sub);
            // SAFETY: the caller guarantees the CPU features.
            let (d, m, split) = unsafe { x.scales.avx512(sub) };
            let w = weights(x, sub);
            for t in 0..T {
                let y = &acts[t][u * SUB + sub];
                let q = |e: usize| _mm512_set1_epi32(quad(y, e));
                let mut a = _mm512_dpbusd_epi32(zero, w[0], q(0));
                let mut b = _mm512_dpbusd_epi32(zero, w[4], q(4));
                for e in 1..4 {
                    a = _mm512_dpbusd_epi32(a, w[e], q(e));
                    b = _mm512_dpbusd_epi32(b, w[e + 4], q(e + 4));
                }
                if F::OFFSET != 0 {
                    let [oa, ob] = offsets::<F>(y);
                    a = _mm512_sub_epi32(a, _mm512_set1_epi32(oa));
                    b = _mm512_sub_epi32(b, _mm512_set1_epi32(ob));
                }
                let s = match F::Scales::SPLIT {
                    true => _mm512_add_epi32(
                        _mm512_mullo_epi32(a, split[0]),
                        _mm512_mullo_epi32(b, split[1]),
                    ),
                    false => _mm512_add_epi32(a, b),
                };
                if F::Scales::MINS {
                    acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(act_sum(y)), acc[t]);
                }
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(y.d));
                acc[t] = _mm512_fmadd_ps(scaled, d, acc[t]);
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        let out = &mut out[t * stride..][..GROUP];
        // SAFETY: `out` holds 16 floats; an unaligned store of that size.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), *acc) };
    }
}
