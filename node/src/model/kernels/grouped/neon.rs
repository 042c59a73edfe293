//! The Advanced SIMD path (every AArch64 CPU; no dot-product extension needed): four
//! rows per vector, a 16-byte load of a sub-block's quants holding four weights of
//! each. The products are widened to i16 by `smull`/`smlal`, four per lane (at most
//! 4 × 63 × 128, within i16), then summed pairwise into each row's exact half sums.

use std::arch::aarch64::*;

use super::{act_sum, offsets, quad, Format, Group, ScaleSet, GROUP};
use crate::model::kernels::activations::{ActBlock, Acts};

/// Rows `4c..4c + 4` of a sub-block: weights `4e..4e + 4` of each row in `w[e]`.
#[inline]
#[target_feature(enable = "neon")]
fn weights<F: Format, const SUB: usize, const PLANES: usize>(
    x: &Group<F, SUB, PLANES>,
    sub: usize,
    c: usize,
) -> [int8x16_t; 8] {
    let low = vdupq_n_u8(0x0F);
    // SAFETY: 16 of the sub-block's 256 quant bytes per load.
    let raw: [uint8x16_t; 4] =
        std::array::from_fn(|k| unsafe { vld1q_u8(x.qs[sub].as_ptr().add(64 * k + 16 * c)) });
    let mut w: [uint8x16_t; 8] = std::array::from_fn(|e| match e < 4 {
        true => vandq_u8(raw[e], low),
        false => vshrq_n_u8::<4>(raw[e - 4]),
    });
    for (p, plane) in x.planes[sub].iter().enumerate() {
        // SAFETY: 16 of the plane's 64 bytes.
        let plane = unsafe { vld1q_u8(plane.as_ptr().add(16 * c)) };
        let bit = vdupq_n_u8(0x10 << p);
        for (e, w) in w.iter_mut().enumerate() {
            // Bit `e` to bit `4 + p`: a negative count shifts right.
            let moved = vshlq_u8(plane, vdupq_n_s8(4 + p as i8 - e as i8));
            *w = vorrq_u8(*w, vandq_u8(moved, bit));
        }
    }
    // Below 64: the same as signed bytes.
    w.map(|w| vreinterpretq_s8_u8(w))
}

/// Four rows' exact sums over weights `4e..4e + 16` against token `y` (`A` or `B`
/// of the module's description, before the offset).
#[inline]
#[target_feature(enable = "neon")]
fn half_sums(w: &[int8x16_t], y: &ActBlock, e: usize) -> int32x4_t {
    let q = |e: usize| vreinterpretq_s8_s32(vdupq_n_s32(quad(y, e)));
    let (q0, w0) = (q(e), w[0]);
    // Rows 4c and 4c + 1 in `front`, 4c + 2 and 4c + 3 in `back`.
    let mut front = vmull_s8(vget_low_s8(w0), vget_low_s8(q0));
    let mut back = vmull_high_s8(w0, q0);
    for (i, &w) in w[1..4].iter().enumerate() {
        let q = q(e + 1 + i);
        front = vmlal_s8(front, vget_low_s8(w), vget_low_s8(q));
        back = vmlal_high_s8(back, w, q);
    }
    vpaddq_s32(vpaddlq_s16(front), vpaddlq_s16(back))
}

#[target_feature(enable = "neon")]
pub fn pass<F: Format, const SUB: usize, const PLANES: usize, const T: usize>(
    units: &[Group<F, SUB, PLANES>],
    acts: [&Acts; T],
    out: &mut [f32],
    stride: usize,
) {
    let blocks = acts[0].blocks.len();
    let mut acc = [[vdupq_n_f32(0.0); 4]; T];
    for (u, x) in units[..blocks / SUB].iter().enumerate() {
        for sub in 0..SUB {
            // SAFETY: the caller guarantees the CPU features.
            let (d, m, split) = unsafe { x.scales.neon(sub) };
            for c in 0..GROUP / 4 {
                let w = weights(x, sub, c);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let y = &acts[t].blocks[u * SUB + sub];
                    let mut a = half_sums(&w[..4], y, 0);
                    let mut b = half_sums(&w[4..], y, 4);
                    if F::OFFSET != 0 {
                        let [oa, ob] = offsets::<F>(y);
                        a = vsubq_s32(a, vdupq_n_s32(oa));
                        b = vsubq_s32(b, vdupq_n_s32(ob));
                    }
                    let s = match F::Scales::SPLIT {
                        true => vmlaq_s32(vmulq_s32(a, split[0][c]), b, split[1][c]),
                        false => vaddq_s32(a, b),
                    };
                    if F::Scales::MINS {
                        acc[c] = vfmaq_f32(acc[c], m[c], vdupq_n_f32(act_sum(y)));
                    }
                    let scaled = vmulq_f32(vcvtq_f32_s32(s), vdupq_n_f32(y.d));
                    acc[c] = vfmaq_f32(acc[c], scaled, d[c]);
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
