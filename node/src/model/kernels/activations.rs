//! Activations quantized to 8 bits per 32-value block, as ggml quantizes them for its
//! dot products (`quantize_row_q8_0` / `_q8_1`), laid out for the kernels.

// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use super::Simd;
use super::BLOCK;

/// One block of 32 quantized activations: scale and (Q8_1) scale × sum of the quants,
/// both rounded to f16 as ggml stores them, and the quants.
#[derive(Clone, Copy, Debug)]
pub struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}

/// Two consecutive blocks laid out for 512-bit kernels: the quants of both, the even
/// block's scale in lanes 0..8 and the odd one's in 8..16. An odd last block has a
/// zero block as its partner.
#[derive(Clone, Copy, Debug)]
pub struct ActPair {
    pub qs: [i8; 64],
    pub d: [f32; 16],
}

/// One token's activations.
pub struct Acts {
    pub blocks: Vec<ActBlock>,
    /// Filled only when asked for (the Q8_0 kernel's AVX-512 layout).
    pub pairs: Vec<ActPair>,
}

impl Acts {
    /// Quantizes `x` (whole blocks); `sums`: also the Q8_1 block sums; `pairs`: also
    /// the blocks as [`ActPair`]s.
    pub fn quantize(x: &[f32], sums: bool, pairs: bool) -> Self {
        let blocks: Vec<ActBlock> = x
            .chunks_exact(BLOCK)
            .map(|xs| {
                let (d, qs) = quantize_block(xs);
                let s = match sums {
                    true => f16_round(d * qs.iter().map(|&q| q as i32).sum::<i32>() as f32),
                    false => 0.0,
                };
                ActBlock {
                    d: f16_round(d),
                    s,
                    qs,
                }
            })
            .collect();
        let pairs = if pairs {
            blocks
                .chunks(2)
                .map(|two| {
                    // An odd last block is paired with a zero block.
                    let zero = ActBlock {
                        d: 0.0,
                        s: 0.0,
                        qs: [0; 32],
                    };
                    let (even, odd) = (&two[0], two.get(1).unwrap_or(&zero));
                    let mut pair = ActPair {
                        qs: [0; 64],
                        d: [even.d; 16],
                    };
                    pair.qs[..32].copy_from_slice(&even.qs);
                    pair.qs[32..].copy_from_slice(&odd.qs);
                    pair.d[8..].fill(odd.d);
                    pair
                })
                .collect()
        } else {
            Vec::new()
        };
        Acts { blocks, pairs }
    }
}

/// An f32 rounded through f16, as blocks store scales.
pub fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// ggml's activation quantization for 32 values (its AVX2 `quantize_row_q8_0/1`):
/// quants `round_half_even(x × 127 / amax)`, scale `amax / 127`. Returns the scale
/// unrounded. Both paths give identical results.
pub fn quantize_block(xs: &[f32]) -> (f32, [i8; BLOCK]) {
    #[cfg(target_arch = "x86_64")]
    if xs.len() == BLOCK && matches!(Simd::cached(), Simd::Avx512 | Simd::Avx2) {
        // SAFETY: the CPU supports AVX2 (checked); `xs` holds 32 values.
        return unsafe { quantize_avx2(xs) };
    }
    quantize_portable(xs)
}

pub fn quantize_portable(xs: &[f32]) -> (f32, [i8; BLOCK]) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; BLOCK];
    for (q, x) in qs.iter_mut().zip(xs) {
        *q = (x * id).round_ties_even() as i8;
    }
    (amax / 127.0, qs)
}

/// # Safety
/// The CPU must support AVX2; `xs` must hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(xs: &[f32]) -> (f32, [i8; BLOCK]) {
    use std::arch::x86_64::*;
    // SAFETY (loads): `xs` holds 32 floats, read in four unaligned 8-float loads.
    let v: [__m256; 4] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) });
    let sign = _mm256_set1_ps(-0.0);
    let mut max = _mm256_andnot_ps(sign, v[0]);
    for x in &v[1..] {
        max = _mm256_max_ps(max, _mm256_andnot_ps(sign, *x));
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` is 8 floats; an unaligned store of exactly that size.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), max) };
    let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    // Round half to even (the default rounding mode), as `round_ties_even`.
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(v[i], id)))
    });
    // Pack to bytes (the values are within ±127), then undo the packs' lane interleave.
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut qs = [0i8; BLOCK];
    // SAFETY: `qs` is 32 bytes; an unaligned store of exactly that size.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), ordered) };
    (amax / 127.0, qs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_paths_agree() {
        let mut cases: Vec<Vec<f32>> = (0..64)
            .map(|i| {
                (0..32)
                    .map(|j| (((i * 32 + j) * 7919 % 1000) as f32 - 500.0) / (1.0 + i as f32))
                    .collect()
            })
            .collect();
        cases.push(vec![0.0; 32]);
        // Exact halves after scaling: 127 × k / 254 = k / 2 for amax 254.
        cases.push(
            (0..32)
                .map(|k| if k == 0 { 254.0 } else { k as f32 })
                .collect(),
        );
        for xs in &cases {
            assert_eq!(quantize_block(xs), quantize_portable(xs), "{xs:?}");
        }
    }
}
