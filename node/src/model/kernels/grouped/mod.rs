//! One kernel for the quantizations whose weights are small unsigned integers with a
//! scale (and a minimum or an offset) per 32 values: Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and
//! Q6_K. Each is a [`Format`] (its own small file beside this one) that decodes its
//! file blocks into quants and a [`ScaleSet`]; the packing and the arithmetic are
//! shared.
//!
//! Weights are kept in groups of [`GROUP`] rows, as [`super::q4_1`] keeps them: per
//! 32-value sub-block, 256 bytes whose nibbles are four weights of every row per
//! 32-bit lane, then up to two planes of the quants' fifth and sixth bits (64 bytes
//! each: byte `4l + i`, bit `e`, belongs to weight `4e + i` of row `l`), so that a
//! shift and a mask put them beside the nibbles. A unit holds one file block of each
//! of the group's rows: one sub-block, or eight for K-quants.
//!
//! The arithmetic every path performs, per row, token and sub-block, in order
//! (activations quantized per 32 values to `d_x`, quants `x` and their exact integer
//! sums; `acc` starting at zero):
//! - `A` and `B`, the exact integer sums `Σ q·x` over the first and the second 16
//!   values, each less `offset × Σ x` (the format's offset: 8, 16, 32 or none);
//! - `S = A + B`, or with the halves' integer scales (Q6_K) `S = s_a·A + s_b·B`;
//! - with minimums: `acc = fma(m, d_x × Σ x, acc)`, the product `d_x × Σ x` in f32;
//! - `acc = fma(S × d_x, d, acc)`, the product `S × d_x` rounded to f32 first.
//!
//! The scales `d` and `m` of a row's sub-block are exact in f32 (an f16 times a small
//! integer), so each format's scale set may form them in any order.

// SIMD intrinsics need `unsafe`; each use is bounded by fixed-size arrays.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scales;

pub use scales::{ScaleSet, SixScales, SuperScales, WithMin, WithOffset};

use std::marker::PhantomData;

use crate::model::tensor_type::TensorType;

use super::activations::{ActBlock, Acts};
use super::matrix::{avx_kernels, neon_kernel, WeightBlock};
use super::BLOCK;

/// Rows per group.
pub const GROUP: usize = 16;

/// A quantization as its file stores it.
pub trait Format: Copy + Send + Sync + 'static {
    const DTYPE: TensorType;
    /// Bytes of one file block.
    const BYTES: usize;
    /// 32-value sub-blocks per file block.
    const SUB: usize;
    /// Bits of a quant above the low four (0, 1 or 2).
    const PLANES: usize;
    /// Subtracted from every quant (a symmetric format's zero point).
    const OFFSET: i32;
    type Scales: ScaleSet;
    /// One row's file block: its `32 × SUB` quants into `quants` (unsigned, below
    /// `16 << PLANES`) and its scales into row `lane` of `scales`.
    fn decode(block: &[u8], quants: &mut [u8], scales: &mut Self::Scales, lane: usize);
}

/// One file block of each of [`GROUP`] rows, packed for the kernels. `SUB` and
/// `PLANES` are the format's (checked when a matrix is built).
#[derive(Clone, Copy)]
pub struct Group<F: Format, const SUB: usize, const PLANES: usize> {
    qs: [[u8; 16 * GROUP]; SUB],
    planes: [[[u8; 4 * GROUP]; PLANES]; SUB],
    scales: F::Scales,
    format: PhantomData<F>,
}

impl<F: Format, const SUB: usize, const PLANES: usize> Group<F, SUB, PLANES> {
    const CHECK: () = assert!(F::SUB == SUB && F::PLANES == PLANES && PLANES <= 2);

    /// Quant `j` of row `lane` in sub-block `sub`.
    fn quant(&self, sub: usize, lane: usize, j: usize) -> i32 {
        let (e, i) = (j / 4, j % 4);
        let byte = self.qs[sub][64 * (e % 4) + 4 * lane + i];
        let mut q = (byte >> (4 * (e / 4))) & 0x0F;
        for (p, plane) in self.planes[sub].iter().enumerate() {
            q |= ((plane[4 * lane + i] >> e) & 1) << (4 + p);
        }
        q as i32
    }

    /// The sub-block's integer sum for one row and token (`S` of the module's
    /// description).
    fn sum(&self, sub: usize, lane: usize, y: &ActBlock, split: [i32; 2]) -> i32 {
        let half = |range: std::ops::Range<usize>| -> i32 {
            range
                .map(|j| self.quant(sub, lane, j) * y.qs[j] as i32)
                .sum()
        };
        let a = half(0..16) - F::OFFSET * y.front;
        let b = half(16..32) - F::OFFSET * (y.sum - y.front);
        match F::Scales::SPLIT {
            true => split[0] * a + split[1] * b,
            false => a + b,
        }
    }
}

/// `d_x × Σ x`: what a row's minimum is multiplied by, one f32 product.
#[inline(always)]
fn act_sum(y: &ActBlock) -> f32 {
    y.d * y.sum as f32
}

impl<F: Format, const SUB: usize, const PLANES: usize> WeightBlock for Group<F, SUB, PLANES> {
    const DTYPE: TensorType = F::DTYPE;
    const VALUES: usize = BLOCK * SUB;
    const BYTES: usize = F::BYTES;
    const ROWS: usize = GROUP;
    const SUMS: bool = true;

    fn parse_rows(rows: &[&[u8]], out: &mut Vec<Self>) {
        let () = Self::CHECK;
        let blocks = rows.first().map_or(0, |r| r.len() / F::BYTES);
        let mut buffer = [0u8; 8 * BLOCK];
        let quants = &mut buffer[..Self::VALUES];
        out.extend((0..blocks).map(|b| {
            let mut group = Group {
                qs: [[0; 16 * GROUP]; SUB],
                planes: [[[0; 4 * GROUP]; PLANES]; SUB],
                scales: F::Scales::ZERO,
                format: PhantomData,
            };
            for (lane, row) in rows.iter().enumerate() {
                F::decode(
                    &row[b * F::BYTES..][..F::BYTES],
                    quants,
                    &mut group.scales,
                    lane,
                );
                for (sub, quants) in quants.chunks_exact(BLOCK).enumerate() {
                    for (j, &q) in quants.iter().enumerate() {
                        let (e, i) = (j / 4, j % 4);
                        group.qs[sub][64 * (e % 4) + 4 * lane + i] |= (q & 0x0F) << (4 * (e / 4));
                        for (p, plane) in group.planes[sub].iter_mut().enumerate() {
                            plane[4 * lane + i] |= ((q >> (4 + p)) & 1) << e;
                        }
                    }
                }
            }
            group
        }));
    }

    /// As ggml dequantizes each format (the same products in the same order).
    fn dequantize(&self, lane: usize, out: &mut Vec<f32>) {
        for sub in 0..SUB {
            let (d, m, split) = self.scales.row(sub, lane);
            out.extend((0..BLOCK).map(|j| {
                let q = self.quant(sub, lane, j);
                match (F::Scales::SPLIT, F::Scales::MINS) {
                    (true, _) => d * split[j / 16] as f32 * (q - F::OFFSET) as f32,
                    (false, true) => d * q as f32 + m,
                    (false, false) => (q - F::OFFSET) as f32 * d,
                }
            }));
        }
    }

    fn dot_portable(row: &[Self], lane: usize, act: &Acts) -> f32 {
        let mut acc = 0f32;
        for (x, ys) in row.iter().zip(act.blocks.chunks_exact(SUB)) {
            for (sub, y) in ys.iter().enumerate() {
                let (d, m, split) = x.scales.row(sub, lane);
                let sum = x.sum(sub, lane, y, split);
                if F::Scales::MINS {
                    acc = m.mul_add(act_sum(y), acc);
                }
                acc = (sum as f32 * y.d).mul_add(d, acc);
            }
        }
        acc
    }

    avx_kernels!(avx2::half, avx512::group);

    neon_kernel!(neon::pass);
}

/// Sub-block `sub`'s share of the cache lines of the unit the kernels prefetch
/// ahead of `x`: over a unit's sub-blocks, every line of it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch<F: Format, const SUB: usize, const PLANES: usize>(
    x: &Group<F, SUB, PLANES>,
    sub: usize,
) {
    let lines = std::mem::size_of::<Group<F, SUB, PLANES>>().div_ceil(64);
    let per_sub = lines.div_ceil(SUB);
    let first = sub * per_sub;
    crate::model::kernels::driver::prefetch_lines(x, first..((sub + 1) * per_sub).min(lines));
}

/// Four quants of a token's block (values `4e..4e + 4`) as one 32-bit lane.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn quad(y: &ActBlock, e: usize) -> i32 {
    let four = &y.qs[4 * e..4 * e + 4];
    // SAFETY: `four` holds 4 bytes; an unaligned read of exactly those.
    unsafe { four.as_ptr().cast::<i32>().read_unaligned() }
}

/// The integer offsets of a token's block halves: `offset × Σ x` over each.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn offsets<F: Format>(y: &ActBlock) -> [i32; 2] {
    [F::OFFSET * y.front, F::OFFSET * (y.sum - y.front)]
}

#[cfg(test)]
mod tests;
