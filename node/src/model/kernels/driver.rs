//! What the matrix kernels share: splitting a matrix product into row tasks for candle's
//! compute threads, tiling rows against tokens, choosing the SIMD path, and the final
//! sum every path performs the same way.

// The SIMD dispatch calls `unsafe` kernels after checking the CPU's features.
#![allow(unsafe_code)]

use super::activations::Acts;
use super::matrix::{Matrix, WeightBlock};
use super::Simd;

/// Output rows per unit of work handed to a compute thread.
const ROWS_PER_TASK: usize = 16;
/// Tokens computed against one pass over a weight row.
pub const TOKENS_PER_TILE: usize = 8;
/// Tokens whose activations are quantized by the calling thread alone.
const QUANTIZE_ALONE: usize = 16;
/// AVX2 has sixteen vector registers: its tiles take at most this many tokens.
#[cfg(target_arch = "x86_64")]
const AVX2_TOKENS: usize = 4;

/// How far ahead of the unit in use the kernels prefetch weights, in bytes: every
/// product streams its weights from memory once.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 1024;

/// Cache lines `lines` (of 64 bytes) of the unit [`PREFETCH`] bytes ahead of `x`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn prefetch_lines<U>(x: &U, lines: std::ops::Range<usize>) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let ahead = (x as *const U).cast::<i8>().wrapping_add(PREFETCH);
    for line in lines {
        // Into L2, not L1: a decode step streams weights faster when the prefetches
        // leave the L1's few fill buffers to the loads in use (see BENCHMARKS.md).
        // SAFETY: a prefetch only hints; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * line)) };
    }
}

/// Every cache line of the unit [`PREFETCH`] bytes ahead of `x`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn prefetch<U>(x: &U) {
    prefetch_lines(x, 0..std::mem::size_of::<U>().div_ceil(64));
}

/// `x @ m^T`: `x` holds rows of `cols` values, the result `rows` values for each.
pub fn matmul<B: WeightBlock>(m: &Matrix<B>, x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let acts: Vec<Acts> = match B::FLOAT {
        true => x.chunks_exact(cols).map(Acts::raw).collect(),
        false => quantize_tokens(x, cols, B::SUMS),
    };
    let tokens = acts.len();
    let mut out = vec![0f32; rows * tokens];
    if tokens == 0 {
        return out;
    }
    let target = TokenMajor {
        out: out.as_mut_ptr(),
        rows,
        tokens,
    };
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    candle_core::utils::barrier_pool().execute_chunked(tasks, |range| {
        for task in range {
            let first = task * ROWS_PER_TASK;
            let count = (rows - first).min(ROWS_PER_TASK);
            // Tiles outermost: the task's rows (a few KiB) stay in cache across them.
            for (t, tile) in acts.chunks(TOKENS_PER_TILE).enumerate() {
                let mut block = [0f32; TOKENS_PER_TILE * ROWS_PER_TASK];
                rows_into(m, first, count, tile, &mut block);
                // SAFETY: rows `first..first + count` belong to this task alone.
                unsafe { target.put(first, t * TOKENS_PER_TILE, tile.len(), &block) };
            }
        }
    });
    out
}

/// The product's `[tokens][rows]` buffer, which the tasks fill each with its own rows.
struct TokenMajor {
    out: *mut f32,
    rows: usize,
    tokens: usize,
}

// SAFETY: tasks write disjoint elements (their own rows) of a buffer that outlives them.
unsafe impl Sync for TokenMajor {}

impl TokenMajor {
    /// Stores a tile's results: `block` is token-major ([`ROWS_PER_TASK`] values per
    /// token, `len` tokens used), rows `first..` for tokens `token..`.
    ///
    /// # Safety
    /// No other thread may access these rows while this runs.
    unsafe fn put(&self, first: usize, token: usize, len: usize, block: &[f32]) {
        let count = (self.rows - first).min(ROWS_PER_TASK);
        assert!(
            token + len <= self.tokens,
            "tokens {token}..{} of {}",
            token + len,
            self.tokens
        );
        for (j, values) in block.chunks_exact(ROWS_PER_TASK).take(len).enumerate() {
            let values = &values[..count];
            // SAFETY: in bounds (first + count <= rows, token + j < tokens);
            // this task's rows only; `values` is a separate buffer.
            unsafe {
                let dst = self.out.add((token + j) * self.rows + first);
                std::ptr::copy_nonoverlapping(values.as_ptr(), dst, count);
            }
        }
    }
}

/// Each token's activations quantized, several tokens across the compute threads.
fn quantize_tokens(values: &[f32], cols: usize, sums: bool) -> Vec<Acts> {
    let tokens: Vec<&[f32]> = values.chunks_exact(cols).collect();
    let quantize = |x: &&[f32]| Acts::quantize(x, sums);
    // A few tokens take less time than waking the other threads.
    match tokens.len() {
        0..QUANTIZE_ALONE => tokens.iter().map(quantize).collect(),
        _ => crate::model::parallel_map(&tokens, quantize),
    }
}

/// Rows `first..first + count` (within one task) against one tile of tokens into
/// `out[t * ROWS_PER_TASK + r]`: pairs of unit rows, then a last single one.
fn rows_into<B: WeightBlock>(
    m: &Matrix<B>,
    first: usize,
    count: usize,
    tile_acts: &[Acts],
    out: &mut [f32; TOKENS_PER_TILE * ROWS_PER_TASK],
) {
    const {
        assert!(
            ROWS_PER_TASK.is_multiple_of(B::ROWS),
            "tasks hold whole unit rows"
        )
    };
    let (units, first) = (count.div_ceil(B::ROWS), first / B::ROWS);
    let mut u = 0;
    while u < units {
        let dst = &mut out[u * B::ROWS..];
        if units - u >= 2 {
            let rows = [m.unit_row(first + u), m.unit_row(first + u + 1)];
            tile(m, rows, tile_acts, dst, ROWS_PER_TASK);
            u += 2;
        } else {
            tile(m, [m.unit_row(first + u)], tile_acts, dst, ROWS_PER_TASK);
            u += 1;
        }
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
            ($kernel:ident, $acts:expr, $out:expr) => {
                // SAFETY: the CPU supports the kernel's features (checked at detection).
                unsafe {
                    match $acts {
                        [a] => B::$kernel::<R, 1>(rows, [a], $out, stride),
                        [a, b] => B::$kernel::<R, 2>(rows, [a, b], $out, stride),
                        [a, b, c] => B::$kernel::<R, 3>(rows, [a, b, c], $out, stride),
                        [a, b, c, d] => B::$kernel::<R, 4>(rows, [a, b, c, d], $out, stride),
                        [a, b, c, d, e] => B::$kernel::<R, 5>(rows, [a, b, c, d, e], $out, stride),
                        [a, b, c, d, e, f] => {
                            B::$kernel::<R, 6>(rows, [a, b, c, d, e, f], $out, stride)
                        }
                        [a, b, c, d, e, f, g] => {
                            B::$kernel::<R, 7>(rows, [a, b, c, d, e, f, g], $out, stride)
                        }
                        [a, b, c, d, e, f, g, h] => {
                            B::$kernel::<R, 8>(rows, [a, b, c, d, e, f, g, h], $out, stride)
                        }
                        _ => unreachable!("tiles hold 1 to {TOKENS_PER_TILE} tokens"),
                    }
                }
            };
        }
        match m.simd() {
            Simd::Avx512 => return dispatch!(tile_avx512, acts, out),
            Simd::Avx2 => {
                for (i, acts) in acts.chunks(AVX2_TOKENS).enumerate() {
                    dispatch!(tile_avx2, acts, &mut out[i * AVX2_TOKENS * stride..]);
                }
                return;
            }
            Simd::Neon | Simd::Portable => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    if m.simd() == Simd::Neon {
        // SAFETY: the CPU has Advanced SIMD (checked at detection).
        return unsafe { B::tile_neon(rows, acts, out, stride) };
    }
    for (u, row) in rows.iter().enumerate() {
        for lane in 0..B::ROWS {
            for (t, act) in acts.iter().enumerate() {
                out[t * stride + u * B::ROWS + lane] = B::dot_portable(row, lane, act);
            }
        }
    }
}

/// `f` of each item, as an array, by a plain loop (the kernels' first step: their
/// inputs cut to the blocks in use). Not `array::map`: the compiler does not always
/// inline it into the SIMD kernels, and a build where a kernel called it for every
/// group of rows prefilled about 10% slower (BENCHMARKS.md, step 18). Only the x86
/// kernels take fixed-size arrays of inputs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn cut_each<'a, X: ?Sized, Y, const N: usize>(
    items: [&'a X; N],
    f: impl Fn(&'a X) -> &'a [Y],
) -> [&'a [Y]; N] {
    let mut out: [&[Y]; N] = [&[]; N];
    for (out, item) in out.iter_mut().zip(items) {
        *out = f(item);
    }
    out
}
