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
pub const TOKENS_PER_TILE: usize = 8;
/// AVX2 has sixteen vector registers: its tiles take at most this many tokens.
const AVX2_TOKENS: usize = 4;

/// Up to [`TOKENS_PER_TILE`] tokens' activations, and for Q4_1 on AVX-512 their
/// block sums gathered per pair of blocks: `s` of the even block for each token in
/// lanes 0..8, of the odd one in 8..16 (zeros past the tile's tokens and blocks).
pub struct Tile<'a> {
    pub acts: &'a [Acts],
    pub sums: Vec<[f32; 16]>,
}

impl<'a> Tile<'a> {
    fn new(acts: &'a [Acts], gather_sums: bool) -> Self {
        let blocks = acts[0].blocks.len();
        let sums = match gather_sums {
            false => Vec::new(),
            true => (0..blocks.div_ceil(2))
                .map(|p| {
                    let mut lanes = [0f32; 16];
                    for (t, act) in acts.iter().enumerate() {
                        lanes[t] = act.blocks[2 * p].s;
                        lanes[8 + t] = act.blocks.get(2 * p + 1).map_or(0.0, |b| b.s);
                    }
                    lanes
                })
                .collect(),
        };
        Tile { acts, sums }
    }
}

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
    let acts =
        crate::model::with_values(x, |values| quantize_tokens(values, cols, B::SUMS, m.simd()))?;
    let tokens = acts.len();
    if tokens == 0 {
        return Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu);
    }
    let gather_sums = B::SUMS && m.simd() == Simd::Avx512;
    let tiles: Vec<Tile> = acts
        .chunks(TOKENS_PER_TILE)
        .map(|chunk| Tile::new(chunk, gather_sums))
        .collect();
    let mut out = vec![0f32; rows * tokens];
    let target = TokenMajor {
        out: out.as_mut_ptr(),
        rows,
        tokens,
    };
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    candle_core::utils::barrier_pool().execute_chunked(tasks, |range| {
        for task in range {
            let first = task * ROWS_PER_TASK;
            let mut chunk = vec![0f32; (rows - first).min(ROWS_PER_TASK) * tokens];
            rows_into(m, first, &tiles, tokens, &mut chunk);
            // SAFETY: rows `first..first + ROWS_PER_TASK` belong to this task alone.
            unsafe { target.put(first, &chunk) };
        }
    });
    Tensor::from_vec(out, dims, &Device::Cpu)
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
    /// Stores rows `first..` from `chunk` (row-major, `tokens` values per row).
    ///
    /// # Safety
    /// No other thread may access these rows while this runs.
    unsafe fn put(&self, first: usize, chunk: &[f32]) {
        for (i, row) in chunk.chunks_exact(self.tokens).enumerate() {
            assert!(first + i < self.rows, "row {} of {}", first + i, self.rows);
            for (t, &v) in row.iter().enumerate() {
                // SAFETY: in bounds (row < rows, t < tokens); this task's row only.
                unsafe { *self.out.add(t * self.rows + first + i) = v };
            }
        }
    }
}

/// Each token's activations quantized, several tokens across the compute threads.
fn quantize_tokens(values: &[f32], cols: usize, sums: bool, simd: Simd) -> Vec<Acts> {
    let tokens: Vec<&[f32]> = values.chunks_exact(cols).collect();
    if tokens.len() < 4 {
        return tokens
            .iter()
            .map(|x| Acts::quantize(x, sums, simd))
            .collect();
    }
    let slots: Vec<Mutex<Option<Acts>>> = tokens.iter().map(|_| Mutex::new(None)).collect();
    candle_core::utils::barrier_pool().execute_chunked(tokens.len(), |range| {
        for t in range {
            let acts = Acts::quantize(tokens[t], sums, simd);
            // Each slot is written once, by one thread: never contended.
            match slots[t].lock() {
                Ok(mut slot) => *slot = Some(acts),
                Err(poisoned) => *poisoned.into_inner() = Some(acts),
            }
        }
    });
    slots
        .into_iter()
        .filter_map(|slot| match slot.into_inner() {
            Ok(acts) => acts,
            Err(poisoned) => poisoned.into_inner(),
        })
        .collect()
}

/// Rows from `first` on, `out.len() / tokens` of them, row-major into `out`: pairs of
/// rows against tiles of tokens. Tiles go outermost, so a task's rows (a few KiB) and
/// one tile's activations stay in cache while the other tiles reuse them.
fn rows_into<B: WeightBlock>(
    m: &Matrix<B>,
    first: usize,
    tiles: &[Tile],
    tokens: usize,
    out: &mut [f32],
) {
    let count = out.len() / tokens;
    for (t, tile_acts) in tiles.iter().enumerate() {
        let mut r = 0;
        while r < count {
            let dst = &mut out[r * tokens + t * TOKENS_PER_TILE..];
            if count - r >= 2 {
                let rows = [m.row(first + r), m.row(first + r + 1)];
                tile(m, rows, tile_acts, dst, tokens);
                r += 2;
            } else {
                tile(m, [m.row(first + r)], tile_acts, dst, tokens);
                r += 1;
            }
        }
    }
}

fn tile<B: WeightBlock, const R: usize>(
    m: &Matrix<B>,
    rows: [&[B]; R],
    tile: &Tile,
    out: &mut [f32],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($kernel:ident, $acts:expr, $out:expr $(, $sums:expr)?) => {
                // SAFETY: the CPU supports the kernel's features (checked at detection).
                unsafe {
                    match $acts {
                        [a] => B::$kernel::<R, 1>(rows, [a] $(, $sums)?, $out, stride),
                        [a, b] => B::$kernel::<R, 2>(rows, [a, b] $(, $sums)?, $out, stride),
                        [a, b, c] => B::$kernel::<R, 3>(rows, [a, b, c] $(, $sums)?, $out, stride),
                        [a, b, c, d] => {
                            B::$kernel::<R, 4>(rows, [a, b, c, d] $(, $sums)?, $out, stride)
                        }
                        [a, b, c, d, e] => {
                            B::$kernel::<R, 5>(rows, [a, b, c, d, e] $(, $sums)?, $out, stride)
                        }
                        [a, b, c, d, e, f] => B::$kernel::<R, 6>(
                            rows,
                            [a, b, c, d, e, f] $(, $sums)?,
                            $out,
                            stride,
                        ),
                        [a, b, c, d, e, f, g] => B::$kernel::<R, 7>(
                            rows,
                            [a, b, c, d, e, f, g] $(, $sums)?,
                            $out,
                            stride,
                        ),
                        [a, b, c, d, e, f, g, h] => B::$kernel::<R, 8>(
                            rows,
                            [a, b, c, d, e, f, g, h] $(, $sums)?,
                            $out,
                            stride,
                        ),
                        _ => unreachable!("tiles hold 1 to {TOKENS_PER_TILE} tokens"),
                    }
                }
            };
        }
        match m.simd() {
            Simd::Avx512 => return dispatch!(tile_avx512, tile.acts, out, &tile.sums),
            Simd::Avx2 => {
                for (i, acts) in tile.acts.chunks(AVX2_TOKENS).enumerate() {
                    dispatch!(tile_avx2, acts, &mut out[i * AVX2_TOKENS..]);
                }
                return;
            }
            Simd::Portable => {}
        }
    }
    for (i, row) in rows.iter().enumerate() {
        for (t, act) in tile.acts.iter().enumerate() {
            out[i * stride + t] = B::dot_portable(row, act);
        }
    }
}

/// The result from the two lane groups (`acc[..8]` for even blocks, `acc[8..]` for odd
/// ones) and the two offset sums, in the one order every path uses.
pub fn finish(acc: [f32; 16], even: f32, odd: f32) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let quad = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    ((quad[0] + quad[2]) + (quad[1] + quad[3])) + (even + odd)
}
