//! The scales of a group's rows, as each family of formats stores them, and how every
//! path reads them: per row and 32-value sub-block, the scale `d`, the minimum `m`
//! (formats with minimums) and the halves' integer scales (Q6_K). Each is exact in
//! f32, so the SIMD readers and [`ScaleSet::row`] agree bit for bit.

// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use half::f16;

use super::GROUP;

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "aarch64")]
use crate::model::kernels::half_neon::f16x4_to_f32;

pub trait ScaleSet: Copy + Send + Sync + 'static {
    const ZERO: Self;
    /// Whether rows have minimums (`w = d·q + m`).
    const MINS: bool;
    /// Whether each half of a sub-block has its own integer scale.
    const SPLIT: bool;
    /// `(d, m, [s_a, s_b])` of row `lane` in sub-block `sub` (unused parts zero).
    fn row(&self, sub: usize, lane: usize) -> (f32, f32, [i32; 2]);
    /// As [`ScaleSet::row`] for all sixteen rows.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512(&self, sub: usize) -> (__m512, __m512, [__m512i; 2]);
    /// As [`ScaleSet::row`] for rows `8 × half..8 × half + 8`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(&self, sub: usize, half: usize) -> (__m256, __m256, [__m256i; 2]);
    /// As [`ScaleSet::row`] for all sixteen rows, rows `4c..4c + 4` in vector `c`.
    ///
    /// # Safety
    /// The CPU must support Advanced SIMD.
    #[cfg(target_arch = "aarch64")]
    unsafe fn neon(&self, sub: usize) -> NeonScales;
}

/// Sixteen rows' `(d, m, [s_a, s_b])`, four rows per vector.
#[cfg(target_arch = "aarch64")]
pub type NeonScales = ([float32x4_t; 4], [float32x4_t; 4], [[int32x4_t; 4]; 2]);

/// Sixteen f16 values as f32, four per vector.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
fn halves_neon(h: &[u16; GROUP]) -> [float32x4_t; 4] {
    // SAFETY: 4 of the 16 values per load.
    [0, 1, 2, 3].map(|c| f16x4_to_f32(unsafe { vld1_u16(h.as_ptr().add(4 * c)) }))
}

/// Sixteen signed bytes as i32, four per vector.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
fn ints_neon(b: &[i8; GROUP]) -> [int32x4_t; 4] {
    // SAFETY: the 16 bytes; a load of exactly those.
    let b = unsafe { vld1q_s8(b.as_ptr()) };
    let (lo, hi) = (vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b));
    [
        vmovl_s16(vget_low_s16(lo)),
        vmovl_high_s16(lo),
        vmovl_s16(vget_low_s16(hi)),
        vmovl_high_s16(hi),
    ]
}

/// Sixteen unsigned bytes as f32, four per vector.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
fn floats_neon(b: &[u8; GROUP]) -> [float32x4_t; 4] {
    // SAFETY: the 16 bytes; a load of exactly those.
    let b = unsafe { vld1q_u8(b.as_ptr()) };
    let (lo, hi) = (vmovl_u8(vget_low_u8(b)), vmovl_high_u8(b));
    [
        vmovl_u16(vget_low_u16(lo)),
        vmovl_high_u16(lo),
        vmovl_u16(vget_low_u16(hi)),
        vmovl_high_u16(hi),
    ]
    .map(|i| vcvtq_f32_u32(i))
}

fn f32_of(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Sixteen f16 values as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn halves512(h: &[u16; GROUP]) -> __m512 {
    // SAFETY: 16 f16 values; an unaligned load of exactly those.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(h.as_ptr().cast()) })
}

/// Eight of sixteen f16 values as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn halves256(h: &[u16; GROUP], half: usize) -> __m256 {
    // SAFETY: 8 of the 16 values; an unaligned 16-byte load.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr().add(8 * half).cast()) })
}

/// A scale per row: symmetric formats (Q4_0, Q5_0), whose offset is the format's.
#[derive(Clone, Copy)]
pub struct WithOffset {
    pub d: [u16; GROUP],
}

impl ScaleSet for WithOffset {
    const ZERO: Self = WithOffset { d: [0; GROUP] };
    const MINS: bool = false;
    const SPLIT: bool = false;

    fn row(&self, _sub: usize, lane: usize) -> (f32, f32, [i32; 2]) {
        (f32_of(self.d[lane]), 0.0, [0; 2])
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx512(&self, _sub: usize) -> (__m512, __m512, [__m512i; 2]) {
        // SAFETY: the caller guarantees the CPU features.
        let d = unsafe { halves512(&self.d) };
        (d, d, unsafe { [_mm512_setzero_si512(); 2] })
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2(&self, _sub: usize, half: usize) -> (__m256, __m256, [__m256i; 2]) {
        // SAFETY: the caller guarantees the CPU features.
        let d = unsafe { halves256(&self.d, half) };
        (d, d, unsafe { [_mm256_setzero_si256(); 2] })
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn neon(&self, _sub: usize) -> NeonScales {
        // SAFETY: the caller guarantees the CPU features.
        let d = unsafe { halves_neon(&self.d) };
        (d, d, [[vdupq_n_s32(0); 4]; 2])
    }
}

/// A scale and a minimum per row (Q5_1).
#[derive(Clone, Copy)]
pub struct WithMin {
    pub d: [u16; GROUP],
    pub m: [u16; GROUP],
}

impl ScaleSet for WithMin {
    const ZERO: Self = WithMin {
        d: [0; GROUP],
        m: [0; GROUP],
    };
    const MINS: bool = true;
    const SPLIT: bool = false;

    fn row(&self, _sub: usize, lane: usize) -> (f32, f32, [i32; 2]) {
        (f32_of(self.d[lane]), f32_of(self.m[lane]), [0; 2])
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx512(&self, _sub: usize) -> (__m512, __m512, [__m512i; 2]) {
        // SAFETY: the caller guarantees the CPU features.
        let (d, m) = unsafe { (halves512(&self.d), halves512(&self.m)) };
        (d, m, unsafe { [_mm512_setzero_si512(); 2] })
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2(&self, _sub: usize, half: usize) -> (__m256, __m256, [__m256i; 2]) {
        // SAFETY: the caller guarantees the CPU features.
        let (d, m) = unsafe { (halves256(&self.d, half), halves256(&self.m, half)) };
        (d, m, unsafe { [_mm256_setzero_si256(); 2] })
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn neon(&self, _sub: usize) -> NeonScales {
        // SAFETY: the caller guarantees the CPU features.
        let (d, m) = unsafe { (halves_neon(&self.d), halves_neon(&self.m)) };
        (d, m, [[vdupq_n_s32(0); 4]; 2])
    }
}

/// Q4_K's and Q5_K's: per row an f16 super-scale and super-minimum, and per sub-block
/// 6-bit multiples of them: `d = D × sc`, `m = −(Dmin × mn)`.
#[derive(Clone, Copy)]
pub struct SuperScales {
    pub d: [u16; GROUP],
    pub dmin: [u16; GROUP],
    pub sc: [[u8; GROUP]; 8],
    pub mn: [[u8; GROUP]; 8],
}

impl ScaleSet for SuperScales {
    const ZERO: Self = SuperScales {
        d: [0; GROUP],
        dmin: [0; GROUP],
        sc: [[0; GROUP]; 8],
        mn: [[0; GROUP]; 8],
    };
    const MINS: bool = true;
    const SPLIT: bool = false;

    fn row(&self, sub: usize, lane: usize) -> (f32, f32, [i32; 2]) {
        let d = f32_of(self.d[lane]) * self.sc[sub][lane] as f32;
        let m = -(f32_of(self.dmin[lane]) * self.mn[sub][lane] as f32);
        (d, m, [0; 2])
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx512(&self, sub: usize) -> (__m512, __m512, [__m512i; 2]) {
        // SAFETY: the caller guarantees the CPU features; 16 bytes of each sub-block's
        // scales, an unaligned load of exactly those.
        unsafe {
            let bytes = |b: &[u8; GROUP]| {
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr().cast())))
            };
            let d = _mm512_mul_ps(halves512(&self.d), bytes(&self.sc[sub]));
            let m = _mm512_mul_ps(halves512(&self.dmin), bytes(&self.mn[sub]));
            let sign = _mm512_set1_epi32(i32::MIN);
            let m = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(m), sign));
            (d, m, [_mm512_setzero_si512(); 2])
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2(&self, sub: usize, half: usize) -> (__m256, __m256, [__m256i; 2]) {
        // SAFETY: the caller guarantees the CPU features; 8 of each sub-block's 16
        // scale bytes, an unaligned 8-byte load.
        unsafe {
            let bytes = |b: &[u8; GROUP]| {
                let eight = _mm_loadl_epi64(b.as_ptr().add(8 * half).cast());
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight))
            };
            let d = _mm256_mul_ps(halves256(&self.d, half), bytes(&self.sc[sub]));
            let m = _mm256_mul_ps(halves256(&self.dmin, half), bytes(&self.mn[sub]));
            let sign = _mm256_set1_epi32(i32::MIN);
            let m = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(m), sign));
            (d, m, [_mm256_setzero_si256(); 2])
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn neon(&self, sub: usize) -> NeonScales {
        // SAFETY: the caller guarantees the CPU features.
        let (d, dmin, sc, mn) = unsafe {
            (
                halves_neon(&self.d),
                halves_neon(&self.dmin),
                floats_neon(&self.sc[sub]),
                floats_neon(&self.mn[sub]),
            )
        };
        let d = [0, 1, 2, 3].map(|c| vmulq_f32(d[c], sc[c]));
        let m = [0, 1, 2, 3].map(|c| vnegq_f32(vmulq_f32(dmin[c], mn[c])));
        (d, m, [[vdupq_n_s32(0); 4]; 2])
    }
}

/// Q6_K's: per row an f16 scale, and per 16 values a signed 8-bit multiple of it.
#[derive(Clone, Copy)]
pub struct SixScales {
    pub d: [u16; GROUP],
    /// `sc[k][row]`: the scale of values `16k..16k + 16`.
    pub sc: [[i8; GROUP]; 16],
}

impl ScaleSet for SixScales {
    const ZERO: Self = SixScales {
        d: [0; GROUP],
        sc: [[0; GROUP]; 16],
    };
    const MINS: bool = false;
    const SPLIT: bool = true;

    fn row(&self, sub: usize, lane: usize) -> (f32, f32, [i32; 2]) {
        let split = [
            self.sc[2 * sub][lane] as i32,
            self.sc[2 * sub + 1][lane] as i32,
        ];
        (f32_of(self.d[lane]), 0.0, split)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx512(&self, sub: usize) -> (__m512, __m512, [__m512i; 2]) {
        // SAFETY: the caller guarantees the CPU features; 16 scale bytes each, an
        // unaligned load of exactly those.
        unsafe {
            let ints = |b: &[i8; GROUP]| _mm512_cvtepi8_epi32(_mm_loadu_si128(b.as_ptr().cast()));
            let d = halves512(&self.d);
            (d, d, [ints(&self.sc[2 * sub]), ints(&self.sc[2 * sub + 1])])
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2(&self, sub: usize, half: usize) -> (__m256, __m256, [__m256i; 2]) {
        // SAFETY: the caller guarantees the CPU features; 8 of 16 scale bytes each, an
        // unaligned 8-byte load.
        unsafe {
            let ints = |b: &[i8; GROUP]| {
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.as_ptr().add(8 * half).cast()))
            };
            let d = halves256(&self.d, half);
            (d, d, [ints(&self.sc[2 * sub]), ints(&self.sc[2 * sub + 1])])
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn neon(&self, sub: usize) -> NeonScales {
        // SAFETY: the caller guarantees the CPU features.
        unsafe {
            let d = halves_neon(&self.d);
            let split = [
                ints_neon(&self.sc[2 * sub]),
                ints_neon(&self.sc[2 * sub + 1]),
            ];
            (d, d, split)
        }
    }
}
