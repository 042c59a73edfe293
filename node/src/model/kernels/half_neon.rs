//! f16 to f32 for the Advanced SIMD kernels, four values at a time. (The vector
//! conversion instruction needs Rust's unstable f16 type; `half` converts one value
//! at a time, in software on CPUs without the FP16 extension, too slow for the
//! thirty-two scales of every block of sixteen rows.)

// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use std::arch::aarch64::*;

/// 2^112: moves an exponent from f16's bias (15) to f32's (127).
const REBIAS: u32 = 0x7780_0000;

/// Four f16 values (their bits) as f32: exactly what `half` gives for every finite
/// value and infinity, subnormals included; NaN stays NaN.
///
/// The f16 magnitude shifted into f32's place reads as a number 2^-112 times the
/// value (a subnormal f32 for a subnormal f16), so one exact multiplication rebiases
/// it; exponent 31 (infinity, NaN) becomes f32's 255 with the same mantissa.
#[inline]
#[target_feature(enable = "neon")]
pub fn f16x4_to_f32(h: uint16x4_t) -> float32x4_t {
    let h = vmovl_u16(h);
    let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
    let magnitude = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7FFF)));
    let rebiased = vmulq_f32(
        vreinterpretq_f32_u32(magnitude),
        vdupq_n_f32(f32::from_bits(REBIAS)),
    );
    let special = vcgeq_u32(magnitude, vdupq_n_u32(0x0F80_0000));
    let bits = vbslq_u32(
        special,
        vorrq_u32(magnitude, vdupq_n_u32(0x7F80_0000)),
        vreinterpretq_u32_f32(rebiased),
    );
    vreinterpretq_f32_u32(vorrq_u32(bits, sign))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_f16_converts_as_half_does() {
        for first in (0..=u16::MAX).step_by(4) {
            let bits = [first, first + 1, first + 2, first + 3];
            let mut got = [0f32; 4];
            // SAFETY: every AArch64 CPU has Advanced SIMD; 4 values each way.
            unsafe { vst1q_f32(got.as_mut_ptr(), f16x4_to_f32(vld1_u16(bits.as_ptr()))) };
            for (&h, &g) in bits.iter().zip(&got) {
                let want = half::f16::from_bits(h).to_f32();
                if want.is_nan() {
                    assert!(g.is_nan(), "{h:#06x}: {g}");
                } else {
                    assert_eq!(g.to_bits(), want.to_bits(), "{h:#06x}: {g} vs {want}");
                }
            }
        }
    }
}
