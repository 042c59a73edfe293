//! Activations quantized to 8 bits per 32-value block, as ggml quantizes them for its
//! dot products (`quantize_row_q8_0` / `_q8_1`), laid out for the kernels.

// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use super::Simd;
use super::BLOCK;

/// One block of 32 quantized activations: scale and (Q8_1) scale × sum of the quants,
/// both rounded to f16 as ggml stores them, and the quants; with the sums, also the
/// exact integer sums of the quants and of their first half (the grouped kernels
/// subtract weight offsets and minimums from these, as ggml's Q8_K block sums).
#[derive(Clone, Copy, Debug)]
pub struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
    pub sum: i32,
    pub front: i32,
}

/// One token's activations.
pub struct Acts {
    pub blocks: Vec<ActBlock>,
    /// The values themselves, for the kernels of 16-bit float weights (and then
    /// no blocks).
    pub values: Vec<f32>,
}

impl Acts {
    /// `x` as it is, for kernels that multiply floats.
    pub fn raw(x: &[f32]) -> Self {
        Acts {
            blocks: Vec::new(),
            values: x.to_vec(),
        }
    }

    /// Quantizes `x` (whole blocks); `sums`: also the Q8_1 block sums and the
    /// quants' integer sums.
    pub fn quantize(x: &[f32], sums: bool) -> Self {
        let mut blocks = Vec::with_capacity(x.len() / BLOCK);
        #[cfg(target_arch = "x86_64")]
        let simd = matches!(Simd::cached(), Simd::Avx512 | Simd::Avx2);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        match simd {
            // SAFETY: the CPU supports AVX2 and F16C (checked at detection).
            #[cfg(target_arch = "x86_64")]
            true => unsafe { quantize_blocks_avx2(x, sums, &mut blocks) },
            _ => quantize_blocks_portable(x, sums, &mut blocks),
        }
        Acts {
            blocks,
            values: Vec::new(),
        }
    }
}

/// An f32 rounded through f16, as blocks store scales.
fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// ggml's activation quantization (its AVX2 `quantize_row_q8_0/1`), for every whole
/// block of `xs`, appended to `out`: quants `round_half_even(x × 127 / amax)`, scale
/// `amax / 127` rounded to f16, and with `sums` the scale (unrounded) × the quants'
/// sum, rounded to f16. [`quantize_blocks_avx2`] gives identical results.
fn quantize_blocks_portable(xs: &[f32], sums: bool, out: &mut Vec<ActBlock>) {
    out.extend(xs.chunks_exact(BLOCK).map(|xs| {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut qs = [0i8; BLOCK];
        for (q, x) in qs.iter_mut().zip(xs) {
            *q = (x * id).round_ties_even() as i8;
        }
        let d = amax / 127.0;
        let (s, sum, front) = match sums {
            true => {
                let sum = qs.iter().map(|&q| q as i32).sum::<i32>();
                let front = qs[..16].iter().map(|&q| q as i32).sum::<i32>();
                (f16_round(d * sum as f32), sum, front)
            }
            false => (0.0, 0, 0),
        };
        ActBlock {
            d: f16_round(d),
            s,
            qs,
            sum,
            front,
        }
    }));
}

/// Every whole block of `xs` as [`quantize_blocks_portable`] makes it, appended to
/// `out`: the block's largest magnitude, its quants and their sum in
/// vector registers, the scales rounded to f16 by F16C (round to nearest even, as
/// `half` rounds). One call per token: a call and the path's checks per block cost
/// as much as the arithmetic.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn quantize_blocks_avx2(xs: &[f32], sums: bool, out: &mut Vec<ActBlock>) {
    use std::arch::x86_64::*;
    // [`f16_round`] by F16C, inlined (the `half` call checks the CPU each time).
    let f16_round = |x: f32| {
        let half = _mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set_ss(x));
        _mm_cvtss_f32(_mm_cvtph_ps(half))
    };
    let sign = _mm256_set1_ps(-0.0);
    for xs in xs.chunks_exact(BLOCK) {
        // SAFETY (loads): `xs` holds 32 floats, read in four unaligned 8-float loads.
        let v: [__m256; 4] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) });
        let abs = |x: __m256| _mm256_andnot_ps(sign, x);
        let max = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        // The largest of the eight lanes (a maximum, whatever the order).
        let max = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
        let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
        let amax = _mm_cvtss_f32(_mm_max_ss(max, _mm_shuffle_ps::<1>(max, max)));
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        // Round half to even (the default rounding mode), as `round_ties_even`.
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v[i], id)))
        });
        // Pack to bytes (the values are within ±127), then undo the packs' lane
        // interleave.
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let d = amax / 127.0;
        let mut block = ActBlock {
            d: f16_round(d),
            s: 0.0,
            qs: [0; BLOCK],
            sum: 0,
            front: 0,
        };
        // SAFETY: `qs` is 32 bytes; an unaligned store of exactly that size.
        unsafe { _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), ordered) };
        if sums {
            // The quants' exact sums (first half, second half), in integers.
            let total = |v: __m256i| {
                let v = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                let v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
                _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32::<1>(v)))
            };
            let front = total(_mm256_add_epi32(q[0], q[1]));
            let sum = front + total(_mm256_add_epi32(q[2], q[3]));
            block.s = f16_round(d * sum as f32);
            block.sum = sum;
            block.front = front;
        }
        out.push(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_paths_agree() {
        let mut cases: Vec<Vec<f32>> = (0..64)
            .map(|i| {
                (0..96)
                    .map(|j| (((i * 96 + j) * 7919 % 1000) as f32 - 500.0) / (1.0 + i as f32))
                    .collect()
            })
            .collect();
        cases.push(vec![0.0; 64]);
        // Exact halves after scaling: 127 × k / 254 = k / 2 for amax 254.
        cases.push(
            (0..32)
                .map(|k| if k == 0 { 254.0 } else { k as f32 })
                .collect(),
        );
        // Scales and sums past f16's range and below its normal numbers.
        cases.push((0..32).map(|k| 1e6 * (k as f32 - 15.5)).collect());
        cases.push((0..32).map(|k| 1e-6 * (k as f32 - 15.5)).collect());
        let fields = |blocks: &[ActBlock]| -> Vec<(u32, u32, [i8; BLOCK], i32, i32)> {
            blocks
                .iter()
                .map(|b| (b.d.to_bits(), b.s.to_bits(), b.qs, b.sum, b.front))
                .collect()
        };
        for xs in &cases {
            for sums in [false, true] {
                let mut portable = Vec::new();
                quantize_blocks_portable(xs, sums, &mut portable);
                assert_eq!(portable.len(), xs.len() / BLOCK);
                let ours = Acts::quantize(xs, sums);
                assert_eq!(fields(&ours.blocks), fields(&portable), "{xs:?}");
            }
        }
    }
}
