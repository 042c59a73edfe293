//! Q8_0 weights (per 32 values: f16 scale, 8-bit quants) times activations quantized
//! to Q8_0: `acc += (d_w × d_x) × lanes` per block, result `lane_sum(acc)` — ggml's
//! AVX2 `vec_dot_q8_0_q8_0`. The test model's embedding, and so its tied LM head, is
//! Q8_0: the largest matrix a client multiplies.
// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Result, Tensor};
use half::f16;

use super::{f16_round, input_rows, lane_sum, parallel_rows, quantize_block, rows_into};
use super::{BlockMatrix, Simd, BLOCK};

/// One block of 32 weights as stored in the file (34 bytes): f16 scale bits, quants.
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    d: u16,
    qs: [i8; 32],
}

/// One block of 32 activations: the scale (an f16 value), 32 signed bytes.
#[derive(Clone, Copy, Debug)]
pub struct ActQ8_0 {
    d: f32,
    qs: [i8; 32],
}

pub struct Q8_0Matrix {
    rows: usize,
    cols: usize,
    /// `rows × cols / 32` blocks, row-major.
    blocks: Vec<BlockQ8_0>,
    simd: Simd,
}

impl Q8_0Matrix {
    /// Takes the blocks of a Q8_0 tensor of shape `[rows, cols]`.
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        if t.dtype() != GgmlDType::Q8_0 {
            bail!("expected a Q8_0 tensor, got {:?}", t.dtype());
        }
        let (rows, cols) = t.shape().dims2()?;
        if cols % BLOCK != 0 {
            bail!("Q8_0 rows of {cols} values are not whole blocks");
        }
        let bytes = t.data()?;
        // ggml's block_q8_0: f16 d, 32 signed bytes (34 bytes).
        let blocks: Vec<BlockQ8_0> = bytes
            .chunks_exact(34)
            .map(|b| {
                let mut qs = [0i8; 32];
                for (q, &byte) in qs.iter_mut().zip(&b[2..34]) {
                    *q = byte as i8;
                }
                BlockQ8_0 {
                    d: u16::from_le_bytes([b[0], b[1]]),
                    qs,
                }
            })
            .collect();
        if blocks.len() != rows * cols / BLOCK {
            bail!(
                "Q8_0 tensor holds {} blocks, expected {}",
                blocks.len(),
                rows * cols / BLOCK
            );
        }
        Ok(Self {
            rows,
            cols,
            blocks,
            simd: Simd::detect(),
        })
    }

    /// The same matrix computed without SIMD (for tests of the SIMD path).
    #[cfg(test)]
    pub fn portable(self) -> Self {
        Self {
            simd: Simd::Portable,
            ..self
        }
    }

    /// One matrix holding the rows of `parts` in order.
    pub fn stack(parts: Vec<Self>) -> Result<Self> {
        let simd = Simd::detect();
        let (rows, cols, blocks) = super::stack_blocks(
            parts
                .into_iter()
                .map(|p| (p.rows, p.cols, p.blocks))
                .collect(),
        )?;
        Ok(Self {
            rows,
            cols,
            blocks,
            simd,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Appends row `r`, dequantized, to `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut Vec<f32>) {
        for x in self.row(r) {
            let d = f16::from_bits(x.d).to_f32();
            out.extend(x.qs.iter().map(|&q| q as f32 * d));
        }
    }

    /// `x`: `[..., cols]` → `[..., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (values, dims) = input_rows(x, self.cols, self.rows)?;
        let activations: Vec<Vec<ActQ8_0>> = values
            .chunks_exact(self.cols)
            .map(|row| {
                row.chunks_exact(BLOCK)
                    .map(|xs| {
                        let (d, qs) = quantize_block(xs);
                        ActQ8_0 {
                            d: f16_round(d),
                            qs,
                        }
                    })
                    .collect()
            })
            .collect();
        parallel_rows(self.rows, activations.len(), dims, |first, out| {
            rows_into(self, first, &activations, out)
        })
    }
}

impl BlockMatrix for Q8_0Matrix {
    type Weight = BlockQ8_0;
    type Act = ActQ8_0;

    fn simd(&self) -> Simd {
        self.simd
    }

    fn row(&self, r: usize) -> &[BlockQ8_0] {
        let per_row = self.cols / BLOCK;
        &self.blocks[r * per_row..(r + 1) * per_row]
    }

    fn dot_portable(row: &[BlockQ8_0], act: &[ActQ8_0]) -> f32 {
        let mut acc = [0f32; 8];
        for (x, y) in row.iter().zip(act) {
            let scale = f16::from_bits(x.d).to_f32() * y.d;
            for (lane, acc) in acc.iter_mut().enumerate() {
                let sumi: i32 = (4 * lane..4 * lane + 4)
                    .map(|j| x.qs[j] as i32 * y.qs[j] as i32)
                    .sum();
                *acc = scale.mul_add(sumi as f32, *acc);
            }
        }
        lane_sum(acc)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[BlockQ8_0]; R],
        acts: [&[ActQ8_0]; T],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { avx2::tile(rows, acts, out, stride) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::lane_sum;
    use super::{ActQ8_0, BlockQ8_0};

    /// How far ahead of the block in use to prefetch weights, in bytes.
    const PREFETCH: usize = 4096;

    /// `R` weight rows against `T` tokens into `out[r * stride + t]`; per row and
    /// token the same operations as `dot_portable`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const R: usize, const T: usize>(
        rows: [&[BlockQ8_0]; R],
        acts: [&[ActQ8_0]; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for b in 0..rows[0].len() {
            let mut w = [_mm256_setzero_si256(); R];
            let mut abs = [_mm256_setzero_si256(); R];
            let mut d = [0f32; R];
            for r in 0..R {
                let x = &rows[r][b];
                _mm_prefetch::<_MM_HINT_T0>(x.qs.as_ptr().wrapping_add(PREFETCH).cast());
                // SAFETY: `qs` is 32 bytes; an unaligned load of exactly that size.
                w[r] = unsafe { _mm256_loadu_si256(x.qs.as_ptr().cast()) };
                abs[r] = _mm256_sign_epi8(w[r], w[r]);
                d[r] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x.d as i32)));
            }
            for t in 0..T {
                let y = &acts[t][b];
                // SAFETY: `qs` is 32 bytes; an unaligned load of exactly that size.
                let a = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
                for r in 0..R {
                    // |w| × (a with w's sign) = w × a; pairs to i16 (at most
                    // 2 × 128 × 127: no saturation), then lanes of four: exact.
                    let signed = _mm256_sign_epi8(a, w[r]);
                    let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(abs[r], signed), ones);
                    let scale = _mm256_set1_ps(d[r] * y.d);
                    acc[r][t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(lanes), acc[r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` is 8 floats; an unaligned store of exactly that size.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][t]) };
                out[r * stride + t] = lane_sum(lanes);
            }
        }
    }
}
