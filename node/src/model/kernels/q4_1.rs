//! Q4_1 weights (per 32 values: f16 scale `d`, f16 minimum `m`, 4-bit quants) times
//! activations quantized to Q8_1 (scale, scale × sum of the quants, 8-bit quants):
//! `acc += (d_w × d_x) × lanes` per block, `summs += m_w × s_x`, result
//! `lane_sum(acc) + summs` — ggml's AVX2 `vec_dot_q4_1_q8_1`.
// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Result, Tensor};
use half::f16;

use super::{f16_round, input_rows, lane_sum, parallel_rows, quantize_block, rows_into};
use super::{BlockMatrix, Simd, BLOCK};

/// One block of 32 weights as stored in the file (20 bytes): scale and minimum as f16
/// bits, 32 nibbles. Kept compact: these blocks are most of a node's memory.
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; 16],
}

impl BlockQ4_1 {
    fn scales(&self) -> (f32, f32) {
        (
            f16::from_bits(self.d).to_f32(),
            f16::from_bits(self.m).to_f32(),
        )
    }

    /// Weight `j` of the block: low nibbles are weights 0..16, high ones 16..32.
    fn weight(&self, j: usize) -> i32 {
        if j < BLOCK / 2 {
            (self.qs[j] & 0x0F) as i32
        } else {
            (self.qs[j - BLOCK / 2] >> 4) as i32
        }
    }
}

/// One block of 32 activations: scale, scale × sum of the quants, 32 signed bytes.
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_1 {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    /// `rows × cols / 32` blocks, row-major.
    blocks: Vec<BlockQ4_1>,
    simd: Simd,
}

impl Q4_1Matrix {
    /// Takes the blocks of a Q4_1 tensor of shape `[rows, cols]`.
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        if t.dtype() != GgmlDType::Q4_1 {
            bail!("expected a Q4_1 tensor, got {:?}", t.dtype());
        }
        let (rows, cols) = t.shape().dims2()?;
        if cols % BLOCK != 0 {
            bail!("Q4_1 rows of {cols} values are not whole blocks");
        }
        let bytes = t.data()?;
        // ggml's block_q4_1: f16 d, f16 m, 16 bytes of nibbles (20 bytes).
        let blocks: Vec<BlockQ4_1> = bytes
            .chunks_exact(20)
            .map(|b| {
                let mut qs = [0u8; 16];
                qs.copy_from_slice(&b[4..20]);
                BlockQ4_1 {
                    d: u16::from_le_bytes([b[0], b[1]]),
                    m: u16::from_le_bytes([b[2], b[3]]),
                    qs,
                }
            })
            .collect();
        if blocks.len() != rows * cols / BLOCK {
            bail!(
                "Q4_1 tensor holds {} blocks, expected {}",
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
            let (d, m) = x.scales();
            out.extend((0..BLOCK).map(|j| x.weight(j) as f32 * d + m));
        }
    }

    /// `x`: `[..., cols]` → `[..., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (values, dims) = input_rows(x, self.cols, self.rows)?;
        let activations: Vec<Vec<BlockQ8_1>> =
            values.chunks_exact(self.cols).map(quantize_q8_1).collect();
        parallel_rows(self.rows, activations.len(), dims, |first, out| {
            rows_into(self, first, &activations, out)
        })
    }
}

/// ggml's `quantize_row_q8_1`: `s` is the unrounded scale times the quants' sum.
fn quantize_q8_1(x: &[f32]) -> Vec<BlockQ8_1> {
    x.chunks_exact(BLOCK)
        .map(|xs| {
            let (d, qs) = quantize_block(xs);
            let sum: i32 = qs.iter().map(|&q| q as i32).sum();
            BlockQ8_1 {
                d: f16_round(d),
                s: f16_round(d * sum as f32),
                qs,
            }
        })
        .collect()
}

impl BlockMatrix for Q4_1Matrix {
    type Weight = BlockQ4_1;
    type Act = BlockQ8_1;

    fn simd(&self) -> Simd {
        self.simd
    }

    fn row(&self, r: usize) -> &[BlockQ4_1] {
        let per_row = self.cols / BLOCK;
        &self.blocks[r * per_row..(r + 1) * per_row]
    }

    fn dot_portable(row: &[BlockQ4_1], act: &[BlockQ8_1]) -> f32 {
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        for (x, y) in row.iter().zip(act) {
            let (d, m) = x.scales();
            let scale = d * y.d;
            for (lane, acc) in acc.iter_mut().enumerate() {
                let sumi: i32 = (4 * lane..4 * lane + 4)
                    .map(|j| x.weight(j) * y.qs[j] as i32)
                    .sum();
                *acc = scale.mul_add(sumi as f32, *acc);
            }
            summs += m * y.s;
        }
        lane_sum(acc) + summs
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[BlockQ4_1]; R],
        acts: [&[BlockQ8_1]; T],
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
    use super::{BlockQ4_1, BlockQ8_1};

    /// How far ahead of the block in use to prefetch weights, in bytes: decode streams
    /// every weight once per token, and waiting for them was most of its time.
    const PREFETCH: usize = 4096;

    /// `R` weight rows against `T` tokens into `out[r * stride + t]`; per row and
    /// token the same operations as `dot_portable`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const R: usize, const T: usize>(
        rows: [&[BlockQ4_1]; R],
        acts: [&[BlockQ8_1]; T],
        out: &mut [f32],
        stride: usize,
    ) {
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut summs = [[0f32; T]; R];
        for b in 0..rows[0].len() {
            let mut w = [_mm256_setzero_si256(); R];
            let mut d = [0f32; R];
            let mut m = [0f32; R];
            for r in 0..R {
                let x = &rows[r][b];
                _mm_prefetch::<_MM_HINT_T0>(x.qs.as_ptr().wrapping_add(PREFETCH).cast());
                // SAFETY: `qs` is 16 bytes; an unaligned load of exactly that size.
                let packed = unsafe { _mm_loadu_si128(x.qs.as_ptr().cast()) };
                let lo = _mm_and_si128(packed, low);
                let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
                w[r] = _mm256_set_m128i(hi, lo);
                // Both f16 scales to f32 in one instruction (exact, as half's to_f32).
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((x.d as u32 | (x.m as u32) << 16) as i32));
                d[r] = _mm_cvtss_f32(dm);
                m[r] = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
            }
            for t in 0..T {
                let y = &acts[t][b];
                // SAFETY: `qs` is 32 bytes; an unaligned load of exactly that size.
                let a = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
                for r in 0..R {
                    // u8 × i8 pairs summed to i16 (at most 2 × 15 × 128: no
                    // saturation), then eight i32 lanes of four products each: exact.
                    let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(w[r], a), ones);
                    let scale = _mm256_set1_ps(d[r] * y.d);
                    acc[r][t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(lanes), acc[r][t]);
                    summs[r][t] += m[r] * y.s;
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` is 8 floats; an unaligned store of exactly that size.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][t]) };
                out[r * stride + t] = lane_sum(lanes) + summs[r][t];
            }
        }
    }
}
