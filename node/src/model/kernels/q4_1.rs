//! Q4_1 weights times activations quantized to Q8_1, as ggml and candle compute it:
//! per 32-value block, `sumi * d_w * d_x + m_w * s_x`, summed over blocks in order.
//!
//! The integer part `sumi` is exact whatever computes it, and the float part is done
//! in the same order as candle's scalar `vec_dot`, so every output equals candle's bit
//! for bit; only the integer part uses AVX2 when the CPU has it.
// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// One block of 32 weights as stored in the file (20 bytes): scale and minimum as f16
/// bits, 32 nibbles. Kept compact: these blocks are most of a node's memory.
#[derive(Clone, Copy, Debug)]
struct BlockQ4_1 {
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
}

/// One block of 32 activations: scale, scale × sum of the quants, 32 signed bytes.
#[derive(Clone, Copy, Debug)]
struct BlockQ8_1 {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    /// `rows × cols / 32` blocks, row-major.
    blocks: Vec<BlockQ4_1>,
    avx2: bool,
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
        // candle's BlockQ4_1 layout: f16 d, f16 m, 16 bytes of nibbles (20 bytes).
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
            avx2: has_avx2(),
        })
    }

    /// `x`: `[..., cols]` → `[..., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == self.cols => *last = self.rows,
            _ => bail!(
                "input of shape {:?} does not end in {}",
                x.dims(),
                self.cols
            ),
        }
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let tokens = values.len() / self.cols;
        let activations: Vec<Vec<BlockQ8_1>> =
            values.chunks_exact(self.cols).map(quantize_q8_1).collect();
        let out = self.matmul(&activations);
        let out = if tokens == 1 {
            out
        } else {
            transpose(&out, self.rows, tokens)
        };
        Tensor::from_vec(out, dims, &Device::Cpu)
    }

    /// Row-major `[rows, tokens]` outputs.
    fn matmul(&self, activations: &[Vec<BlockQ8_1>]) -> Vec<f32> {
        let tokens = activations.len();
        let per_row = self.cols / BLOCK;
        let mut out = vec![0f32; self.rows * tokens];
        candle_core::utils::with_threadpool(|| {
            out.par_chunks_mut(ROWS_PER_TASK * tokens)
                .enumerate()
                .for_each(|(task, chunk)| {
                    let first = task * ROWS_PER_TASK;
                    for (i, row_out) in chunk.chunks_mut(tokens).enumerate() {
                        let row = &self.blocks[(first + i) * per_row..(first + i + 1) * per_row];
                        for (o, act) in row_out.iter_mut().zip(activations) {
                            *o = self.dot(row, act);
                        }
                    }
                });
        });
        out
    }

    fn dot(&self, row: &[BlockQ4_1], act: &[BlockQ8_1]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: the CPU supports AVX2 and F16C (checked at construction).
            return unsafe { avx2::dot(row, act) };
        }
        dot_scalar(row, act)
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn transpose(rows_by_tokens: &[f32], rows: usize, tokens: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * tokens];
    for r in 0..rows {
        for t in 0..tokens {
            out[t * rows + r] = rows_by_tokens[r * tokens + t];
        }
    }
    out
}

/// ggml's `quantize_row_q8_1`, with candle's roundings (the sum scaled in f16).
fn quantize_q8_1(x: &[f32]) -> Vec<BlockQ8_1> {
    x.chunks_exact(BLOCK)
        .map(|xs| {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let d16 = f16::from_f32(d);
            let mut qs = [0i8; 32];
            let mut sum = 0i32;
            for j in 0..BLOCK / 2 {
                qs[j] = (xs[j] * id).round() as i8;
                qs[j + BLOCK / 2] = (xs[j + BLOCK / 2] * id).round() as i8;
                sum += qs[j] as i32 + qs[j + BLOCK / 2] as i32;
            }
            BlockQ8_1 {
                d: d16.to_f32(),
                s: (f16::from_f32(sum as f32) * d16).to_f32(),
                qs,
            }
        })
        .collect()
}

fn sumi_scalar(x: &BlockQ4_1, y: &BlockQ8_1) -> i32 {
    let mut sumi = 0i32;
    for j in 0..BLOCK / 2 {
        let v0 = (x.qs[j] & 0x0F) as i32;
        let v1 = (x.qs[j] >> 4) as i32;
        sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + BLOCK / 2] as i32;
    }
    sumi
}

fn dot_scalar(row: &[BlockQ4_1], act: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in row.iter().zip(act) {
        let (d, m) = x.scales();
        sumf += sumi_scalar(x, y) as f32 * d * y.d + m * y.s;
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_1};

    /// Same result as `dot_scalar`: the integer sums are exact, the float steps are
    /// the same operations in the same order.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn dot(row: &[BlockQ4_1], act: &[BlockQ8_1]) -> f32 {
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut sumf = 0f32;
        for (x, y) in row.iter().zip(act) {
            // SAFETY: `qs` are 16 and 32 bytes; unaligned loads of exactly that size.
            let packed = unsafe { _mm_loadu_si128(x.qs.as_ptr().cast()) };
            let lo = _mm_and_si128(packed, low);
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
            // Weights 0..16 are the low nibbles, 16..32 the high ones, as in ggml.
            let w = _mm256_set_m128i(hi, lo);
            let a = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
            // u8 × i8 pairs summed to i16: at most 2 × 15 × 128, no saturation.
            let pairs = _mm256_maddubs_epi16(w, a);
            let quads = _mm256_madd_epi16(pairs, ones);
            let sum128 = _mm_add_epi32(
                _mm256_castsi256_si128(quads),
                _mm256_extracti128_si256(quads, 1),
            );
            let sum64 = _mm_add_epi32(sum128, _mm_unpackhi_epi64(sum128, sum128));
            let sum32 = _mm_add_epi32(sum64, _mm_shuffle_epi32(sum64, 1));
            let sumi = _mm_cvtsi128_si32(sum32);
            // Both f16 scales to f32 in one instruction (exact, as half's to_f32).
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((x.d as u32 | (x.m as u32) << 16) as i32));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
            sumf += sumi as f32 * d * y.d + m * y.s;
        }
        sumf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    fn weights(rows: usize, cols: usize) -> QTensor {
        let w = Tensor::randn(0f32, 0.5, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()
    }

    #[test]
    fn equals_candle_bit_for_bit() {
        for (rows, cols, tokens) in [(96, 64, 1), (192, 576, 1), (70, 576, 5), (33, 128, 3)] {
            let q = weights(rows, cols);
            let ours = Q4_1Matrix::from_qtensor(&q).unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, tokens, cols), &Device::Cpu).unwrap();
            let a = ours
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = theirs
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{rows}x{cols}, {tokens} tokens: {:?} vs {:?}",
                &a[..4],
                &b[..4]
            );
        }
    }

    #[test]
    fn simd_and_scalar_agree() {
        let q = weights(64, 256);
        let m = Q4_1Matrix::from_qtensor(&q).unwrap();
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let act = quantize_q8_1(&x);
        for r in 0..64 {
            let row = &m.blocks[r * 8..(r + 1) * 8];
            assert_eq!(m.dot(row, &act).to_bits(), dot_scalar(row, &act).to_bits());
        }
    }
}
