//! What both kernels share: splitting a matrix product into row tasks for candle's
//! compute threads, tiling rows against tokens, choosing the SIMD path, and the final
//! sum every path performs the same way.

// The SIMD dispatch calls `unsafe` kernels after checking the CPU's features.
#![allow(unsafe_code)]

use std::sync::Mutex;

use candle_core::{bail, Device, Result, Tensor};

use super::activations::Acts;
use super::matrix::{Matrix, WeightBlock};
use super::Simd;

/// Output rows per unit of work handed to a compute thread.
const ROWS_PER_TASK: usize = 16;
/// Tokens computed against one pass over a weight row.
pub const TOKENS_PER_TILE: usize = 4;

/// `x @ m^T`: `x` is `[..., cols]`, the result `[..., rows]`.
pub fn matmul<B: WeightBlock>(
    m: &Matrix<B>,
    x: &Tensor,
    rows: usize,
    cols: usize,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == cols => *last = rows,
        _ => bail!("input of shape {:?} does not end in {cols}", x.dims()),
    }
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    let acts: Vec<Acts> = values
        .chunks_exact(cols)
        .map(|row| Acts::quantize(row, B::SUMS, m.simd()))
        .collect();
    let tokens = acts.len();
    let mut out = vec![0f32; rows * tokens];
    let tasks: Vec<Mutex<&mut [f32]>> = out
        .chunks_mut(ROWS_PER_TASK * tokens)
        .map(Mutex::new)
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        for task in range {
            // Each task is taken once, so the lock is never contended.
            let mut chunk = match tasks[task].lock() {
                Ok(chunk) => chunk,
                Err(poisoned) => poisoned.into_inner(),
            };
            rows_into(m, task * ROWS_PER_TASK, &acts, &mut chunk);
        }
    });
    drop(tasks);
    let out = if tokens == 1 {
        out
    } else {
        transpose(&out, rows, tokens)
    };
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// Rows from `first` on, `out.len() / tokens` of them, row-major into `out`: pairs of
/// rows against tiles of up to [`TOKENS_PER_TILE`] tokens.
fn rows_into<B: WeightBlock>(m: &Matrix<B>, first: usize, acts: &[Acts], out: &mut [f32]) {
    let tokens = acts.len();
    let count = out.len() / tokens;
    let mut r = 0;
    while r < count {
        let pair = count - r >= 2;
        for (t, tile_acts) in acts.chunks(TOKENS_PER_TILE).enumerate() {
            let dst = &mut out[r * tokens + t * TOKENS_PER_TILE..];
            if pair {
                let rows = [m.row(first + r), m.row(first + r + 1)];
                tile(m, rows, tile_acts, dst, tokens);
            } else {
                tile(m, [m.row(first + r)], tile_acts, dst, tokens);
            }
        }
        r += if pair { 2 } else { 1 };
    }
}

fn tile<B: WeightBlock, const R: usize>(
    m: &Matrix<B>,
    rows: [&[B]; R],
    acts: &[Acts],
    out: &mut [f32],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($kernel:ident) => {
                // SAFETY: the CPU supports the kernel's features (checked at detection).
                unsafe {
                    match acts {
                        [a] => B::$kernel::<R, 1>(rows, [a], out, stride),
                        [a, b] => B::$kernel::<R, 2>(rows, [a, b], out, stride),
                        [a, b, c] => B::$kernel::<R, 3>(rows, [a, b, c], out, stride),
                        [a, b, c, d] => B::$kernel::<R, 4>(rows, [a, b, c, d], out, stride),
                        _ => unreachable!("tiles hold 1 to {TOKENS_PER_TILE} tokens"),
                    }
                }
            };
        }
        match m.simd() {
            Simd::Avx512 => return dispatch!(tile_avx512),
            Simd::Avx2 => return dispatch!(tile_avx2),
            Simd::Portable => {}
        }
    }
    for (i, row) in rows.iter().enumerate() {
        for (t, act) in acts.iter().enumerate() {
            out[i * stride + t] = B::dot_portable(row, act);
        }
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

/// The result from the two lane groups (`acc[..8]` for even blocks, `acc[8..]` for odd
/// ones) and the two offset sums, in the one order every path uses.
pub fn finish(acc: [f32; 16], even: f32, odd: f32) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let quad = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    ((quad[0] + quad[2]) + (quad[1] + quad[3])) + (even + odd)
}
