//! Matrix kernels for the quantized weights of the test model family, which candle
//! runs slowly on plain builds (no SIMD for Q4_1 unless the whole binary targets the
//! host CPU).
//!
//! Both kernels follow ggml's AVX2 arithmetic: per 32-value block the integer products
//! are summed in eight lanes of four, each lane accumulated in f32 with one fused
//! multiply-add by the two block scales; the result is the lanes' sum (in
//! [`lane_sum`]'s order) plus any per-block offsets. Every output is one fixed
//! sequence of float operations whatever the tile, thread count or batch it is
//! computed in, and the portable path performs the same sequence, so results are
//! bit-identical with and without SIMD, and a token's result does not depend on which
//! other tokens share its batch (batched decode relies on that). SIMD is chosen at run
//! time: AVX2 with FMA and F16C.

// The SIMD dispatch calls `unsafe` kernels; the kernels check CPU features first.
#![allow(unsafe_code)]

pub mod q4_1;
pub mod q8_0;

use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{bail, Device, Module, Result, Tensor};

/// Values per quantized block.
const BLOCK: usize = 32;
/// Output rows per unit of work handed to a compute thread.
const ROWS_PER_TASK: usize = 16;
/// Tokens computed against one pass over a weight row.
const TOKENS_PER_TILE: usize = 4;

/// A weight matrix.
pub enum Linear {
    /// Any quantization candle supports, computed by candle.
    Candle(QMatMul),
    /// Q4_1, computed by [`q4_1::Q4_1Matrix`].
    Q4_1(q4_1::Q4_1Matrix),
    /// Q8_0, computed by [`q8_0::Q8_0Matrix`].
    Q8_0(q8_0::Q8_0Matrix),
}

impl Linear {
    pub fn new(weights: Arc<QTensor>) -> Result<Self> {
        match weights.dtype() {
            GgmlDType::Q4_1 => Ok(Linear::Q4_1(q4_1::Q4_1Matrix::from_qtensor(&weights)?)),
            GgmlDType::Q8_0 => Ok(Linear::Q8_0(q8_0::Q8_0Matrix::from_qtensor(&weights)?)),
            _ => Ok(Linear::Candle(QMatMul::from_arc(weights)?)),
        }
    }

    /// Rows `ids` of the matrix, dequantized: `[ids.len(), in]` (an embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (rows, cols) = match self {
            Linear::Candle(m) => {
                let ids = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                return m.embedding(&ids);
            }
            Linear::Q4_1(m) => (m.rows(), m.cols()),
            Linear::Q8_0(m) => (m.rows(), m.cols()),
        };
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            let id = id as usize;
            if id >= rows {
                bail!("row {id} of a matrix of {rows} rows");
            }
            match self {
                Linear::Q4_1(m) => m.dequantize_row(id, &mut out),
                Linear::Q8_0(m) => m.dequantize_row(id, &mut out),
                Linear::Candle(_) => unreachable!("handled above"),
            }
        }
        Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)
    }

    /// `x`: `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Q4_1(m) => m.forward(x),
            Linear::Q8_0(m) => m.forward(x),
        }
    }
}

/// Weight matrices that share their input (attention's Q, K and V; the MLP's gate
/// and up), multiplied as one stacked matrix when their type allows: one pass over
/// the input and one parallel dispatch instead of several. Each output row is computed
/// exactly as it would be alone.
pub enum Stacked {
    /// One matrix whose rows are the parts' rows in order; the parts' row counts.
    One(Linear, Vec<usize>),
    /// Parts of other types, multiplied one by one.
    Each(Vec<Linear>),
}

impl Stacked {
    pub fn new(parts: Vec<Arc<QTensor>>) -> Result<Self> {
        let sizes: Vec<usize> = parts
            .iter()
            .map(|p| p.shape().dims2().map(|(rows, _)| rows))
            .collect::<Result<_>>()?;
        let dtype = parts.first().map(|p| p.dtype());
        let same = |d: GgmlDType| parts.iter().all(|p| p.dtype() == d);
        match dtype {
            Some(GgmlDType::Q4_1) if same(GgmlDType::Q4_1) => {
                let parts: Vec<_> = parts
                    .iter()
                    .map(|p| q4_1::Q4_1Matrix::from_qtensor(p))
                    .collect::<Result<_>>()?;
                Ok(Stacked::One(
                    Linear::Q4_1(q4_1::Q4_1Matrix::stack(parts)?),
                    sizes,
                ))
            }
            Some(GgmlDType::Q8_0) if same(GgmlDType::Q8_0) => {
                let parts: Vec<_> = parts
                    .iter()
                    .map(|p| q8_0::Q8_0Matrix::from_qtensor(p))
                    .collect::<Result<_>>()?;
                Ok(Stacked::One(
                    Linear::Q8_0(q8_0::Q8_0Matrix::stack(parts)?),
                    sizes,
                ))
            }
            _ => Ok(Stacked::Each(
                parts.into_iter().map(Linear::new).collect::<Result<_>>()?,
            )),
        }
    }

    /// `x`: `[..., in]` → one contiguous `[..., rows_i]` per part.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Stacked::Each(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Stacked::One(linear, sizes) => {
                let y = linear.forward(x)?;
                let last = y.rank() - 1;
                let mut start = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        let part = y.narrow(last, start, n)?.contiguous();
                        start += n;
                        part
                    })
                    .collect()
            }
        }
    }
}

/// Appends the rows of `parts` (each `(rows, cols, blocks)`) into one matrix.
fn stack_blocks<B>(parts: Vec<(usize, usize, Vec<B>)>) -> Result<(usize, usize, Vec<B>)> {
    let cols = match parts.first() {
        Some(&(_, cols, _)) => cols,
        None => bail!("nothing to stack"),
    };
    if parts.iter().any(|&(_, c, _)| c != cols) {
        bail!("stacked matrices must have equal row lengths");
    }
    let rows = parts.iter().map(|p| p.0).sum();
    let blocks = parts.into_iter().flat_map(|p| p.2).collect();
    Ok((rows, cols, blocks))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Simd {
    Avx2,
    Portable,
}

impl Simd {
    fn cached() -> Self {
        static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *SIMD.get_or_init(Simd::detect)
    }

    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Simd::Avx2;
        }
        Simd::Portable
    }
}

/// A matrix of quantized blocks, row-major, multiplied with activations quantized to
/// `Act` blocks: what [`rows_into`] needs from each kernel.
trait BlockMatrix: Sync {
    type Weight: Sync;
    type Act: Sync;

    fn simd(&self) -> Simd;
    fn row(&self, r: usize) -> &[Self::Weight];
    /// One output, in the portable path's operations.
    fn dot_portable(row: &[Self::Weight], act: &[Self::Act]) -> f32;
    /// `R` rows against `T` tokens into `out[r * stride + t]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[Self::Weight]; R],
        acts: [&[Self::Act]; T],
        out: &mut [f32],
        stride: usize,
    );
}

/// Rows from `first` on, `out.len() / tokens` of them, row-major into `out`: pairs of
/// rows against tiles of up to [`TOKENS_PER_TILE`] tokens.
fn rows_into<M: BlockMatrix>(m: &M, first: usize, activations: &[Vec<M::Act>], out: &mut [f32]) {
    let tokens = activations.len();
    let count = out.len() / tokens;
    let mut r = 0;
    while r < count {
        let pair = count - r >= 2;
        for (t, acts) in activations.chunks(TOKENS_PER_TILE).enumerate() {
            let dst = &mut out[r * tokens + t * TOKENS_PER_TILE..];
            if pair {
                tile(
                    m,
                    [m.row(first + r), m.row(first + r + 1)],
                    acts,
                    dst,
                    tokens,
                );
            } else {
                tile(m, [m.row(first + r)], acts, dst, tokens);
            }
        }
        r += if pair { 2 } else { 1 };
    }
}

fn tile<M: BlockMatrix, const R: usize>(
    m: &M,
    rows: [&[M::Weight]; R],
    acts: &[Vec<M::Act>],
    out: &mut [f32],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if m.simd() == Simd::Avx2 {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked at construction).
        unsafe {
            match acts {
                [a] => M::tile_avx2::<R, 1>(rows, [a], out, stride),
                [a, b] => M::tile_avx2::<R, 2>(rows, [a, b], out, stride),
                [a, b, c] => M::tile_avx2::<R, 3>(rows, [a, b, c], out, stride),
                [a, b, c, d] => M::tile_avx2::<R, 4>(rows, [a, b, c, d], out, stride),
                _ => unreachable!("tiles hold 1 to {TOKENS_PER_TILE} tokens"),
            }
        }
        return;
    }
    for (i, row) in rows.iter().enumerate() {
        for (t, act) in acts.iter().enumerate() {
            out[i * stride + t] = M::dot_portable(row, act);
        }
    }
}

/// The flattened rows of `x` (`[..., cols]`) and the output shape `[..., rows]`.
fn input_rows(x: &Tensor, cols: usize, rows: usize) -> Result<(Vec<f32>, Vec<usize>)> {
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == cols => *last = rows,
        _ => bail!("input of shape {:?} does not end in {cols}", x.dims()),
    }
    Ok((x.flatten_all()?.to_vec1::<f32>()?, dims))
}

/// Computes `rows × tokens` outputs on candle's compute threads, `ROWS_PER_TASK` rows
/// per task: `rows_into(first, out)` fills rows `first..` row-major into `out`. Returns
/// token-major outputs (`[tokens, rows]`) as a tensor of shape `dims`.
fn parallel_rows(
    rows: usize,
    tokens: usize,
    dims: Vec<usize>,
    rows_into: impl Fn(usize, &mut [f32]) + Sync,
) -> Result<Tensor> {
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
            rows_into(task * ROWS_PER_TASK, &mut chunk);
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

fn transpose(rows_by_tokens: &[f32], rows: usize, tokens: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * tokens];
    for r in 0..rows {
        for t in 0..tokens {
            out[t * rows + r] = rows_by_tokens[r * tokens + t];
        }
    }
    out
}

/// The sum of eight lanes in the order the AVX2 paths add them.
fn lane_sum(v: [f32; 8]) -> f32 {
    let quad = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (quad[0] + quad[2]) + (quad[1] + quad[3])
}

/// ggml's activation quantization for 32 values (its AVX2 `quantize_row_q8_0/1`):
/// quants `round_half_even(x × 127 / amax)`, scale `amax / 127`. Returns the scale
/// unrounded; blocks store it as f16. Both paths give identical results.
fn quantize_block(xs: &[f32]) -> (f32, [i8; BLOCK]) {
    #[cfg(target_arch = "x86_64")]
    if xs.len() == BLOCK && Simd::cached() == Simd::Avx2 {
        // SAFETY: the CPU supports AVX2 (checked); `xs` holds 32 values.
        return unsafe { quantize_avx2(xs) };
    }
    quantize_portable(xs)
}

fn quantize_portable(xs: &[f32]) -> (f32, [i8; BLOCK]) {
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

/// An f32 rounded through f16, as blocks store scales.
fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

#[cfg(test)]
mod tests {
    //! Shared checks for both kernels, run on random weights.
    use super::*;

    pub fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    pub fn weights(dtype: GgmlDType, rows: usize, cols: usize) -> QTensor {
        let w = Tensor::randn(0f32, 0.5, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// `build(weights, portable)` makes the kernel's matrix.
    fn check(dtype: GgmlDType, build: impl Fn(&QTensor, bool) -> Linear) {
        for (rows, cols, tokens) in [(96, 64, 1), (192, 576, 1), (70, 576, 5), (33, 128, 9)] {
            let q = weights(dtype, rows, cols);
            let ours = build(&q, false);
            let plain = build(&q, true);
            let theirs = QMatMul::from_qtensor(q).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, tokens, cols), &Device::Cpu).unwrap();
            let a = values(&ours.forward(&x).unwrap());
            let b = values(&theirs.forward(&x).unwrap());
            let c = values(&plain.forward(&x).unwrap());
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(&b) {
                // Candle rounds activations to 8 bits slightly differently (away from
                // zero, with a rounded reciprocal) and sums in another order.
                assert!((x - y).abs() <= 1e-3 * scale, "{x} vs {y} ({rows}x{cols})");
            }
            assert!(
                a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()),
                "SIMD and portable paths differ ({rows}x{cols}, {tokens} tokens)"
            );
            // A token's outputs do not depend on its batch.
            for t in [0, tokens - 1] {
                let alone = values(&ours.forward(&x.narrow(1, t, 1).unwrap()).unwrap());
                let batched = &a[t * rows..(t + 1) * rows];
                assert!(
                    alone
                        .iter()
                        .zip(batched)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "token {t} differs when batched ({rows}x{cols})"
                );
            }
        }
    }

    #[test]
    fn stacked_parts_equal_separate_matrices() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let parts: Vec<Arc<QTensor>> = [64, 32, 32]
                .into_iter()
                .map(|rows| Arc::new(weights(dtype, rows, 128)))
                .collect();
            let stacked = Stacked::new(parts.clone()).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, 3, 128), &Device::Cpu).unwrap();
            let outputs = stacked.forward(&x).unwrap();
            for (part, out) in parts.into_iter().zip(outputs) {
                let alone = Linear::new(part).unwrap().forward(&x).unwrap();
                assert_eq!(values(&alone), values(&out), "{dtype:?}");
            }
        }
    }

    #[test]
    fn quantization_paths_agree() {
        let x = values(&Tensor::randn(0f32, 3.0, 32 * 64, &Device::Cpu).unwrap());
        let mut cases: Vec<Vec<f32>> = x.chunks(32).map(<[f32]>::to_vec).collect();
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

    #[test]
    fn rows_equal_candles_dequantization() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = Arc::new(weights(dtype, 10, 64));
            let ours = Linear::new(q.clone()).unwrap().rows(&[7, 0, 7]).unwrap();
            let all = q.dequantize(&Device::Cpu).unwrap();
            let ids = Tensor::new(&[7u32, 0, 7], &Device::Cpu).unwrap();
            let theirs = all.index_select(&ids, 0).unwrap();
            assert_eq!(values(&ours), values(&theirs), "{dtype:?}");
            assert!(Linear::new(q).unwrap().rows(&[10]).is_err());
        }
    }

    #[test]
    fn q4_1_agrees_with_candle_and_is_the_same_on_every_path() {
        check(GgmlDType::Q4_1, |q, portable| {
            let m = q4_1::Q4_1Matrix::from_qtensor(q).unwrap();
            Linear::Q4_1(if portable { m.portable() } else { m })
        });
    }

    #[test]
    fn q8_0_agrees_with_candle_and_is_the_same_on_every_path() {
        check(GgmlDType::Q8_0, |q, portable| {
            let m = q8_0::Q8_0Matrix::from_qtensor(q).unwrap();
            Linear::Q8_0(if portable { m.portable() } else { m })
        });
    }
}
