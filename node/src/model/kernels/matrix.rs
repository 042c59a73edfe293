//! A weight matrix of quantized blocks, whatever the block type: reading it from GGUF
//! tensors, dequantizing rows, and multiplying it with activations through the
//! block type's kernels ([`WeightBlock`]). A block type may hold blocks of several
//! rows side by side, laid out for its kernels (Q4_1 keeps groups of 16 rows).

// The SIMD kernels of a block type are `unsafe` to call (CPU features).
#![allow(unsafe_code)]

use candle_core::{bail, Device, Result, Tensor};

use super::activations::Acts;
use super::driver::matmul;
use super::pages::{Blocks, Placing};
use super::{Simd, BLOCK};
use crate::model::hidden::Hidden;
use crate::model::tensor_type::{StoredTensor, TensorType};

/// Most tokens per pass over a unit row's blocks on Arm: a block's weights are
/// unpacked once for them, and each token's accumulators for 16 rows are four of the
/// 32 vector registers (not tuned on Arm hardware).
#[cfg(target_arch = "aarch64")]
pub const NEON_TOKENS: usize = 4;

/// A unit of quantized weights (one block of `VALUES` values of each of `ROWS` rows),
/// and the kernels that multiply rows of them. Each type documents the fixed sequence
/// of float operations every path performs per output.
pub trait WeightBlock: Copy + Send + Sync + 'static {
    const DTYPE: TensorType;
    /// Values of a row one unit holds: the file's block (32, or 256 for K-quants).
    const VALUES: usize = BLOCK;
    /// Bytes of one file block (`VALUES` values).
    const BYTES: usize;
    /// Rows one unit holds: a matrix is `rows.div_ceil(ROWS)` rows of units (unit
    /// rows), each `cols / VALUES` units long; the rows past the last are zero.
    const ROWS: usize;
    /// Whether activations carry Q8_1 block sums.
    const SUMS: bool;
    /// Whether the kernels read the activations as they are (f32), not quantized.
    const FLOAT: bool = false;

    /// Appends one unit row from up to `ROWS` rows of whole blocks as stored in the
    /// file (all of one length).
    fn parse_rows(rows: &[&[u8]], out: &mut Vec<Self>);
    /// Appends the `VALUES` values of row `lane` of the unit.
    fn dequantize(&self, lane: usize, out: &mut Vec<f32>);
    /// One output: row `lane` of a unit row, in plain Rust.
    fn dot_portable(row: &[Self], lane: usize, act: &Acts) -> f32;
    /// Rows `8 × half..8 × half + 8` of one unit row against `T` tokens, one row per
    /// lane, into `out[t * stride + row]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn half_avx2<const T: usize>(
        row: &[Self],
        half: usize,
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    );
    /// Every row of one unit row against `T` tokens, one row per lane, into
    /// `out[t * stride + row]`.
    ///
    /// # Safety
    /// The CPU must support what [`Simd::Avx512`] requires.
    #[cfg(target_arch = "x86_64")]
    unsafe fn group_avx512<const T: usize>(
        row: &[Self],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    );
    /// As [`WeightBlock::group_avx512`] with Arm's 128-bit vectors, for the `T` tokens
    /// of `acts` (at most [`NEON_TOKENS`]); by default the portable arithmetic (a type
    /// without an Arm kernel).
    ///
    /// # Safety
    /// The CPU must support Advanced SIMD (NEON).
    #[cfg(target_arch = "aarch64")]
    unsafe fn pass_neon<const T: usize>(
        row: &[Self],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        for lane in 0..Self::ROWS {
            for (t, act) in acts.iter().enumerate() {
                out[t * stride + lane] = Self::dot_portable(row, lane, act);
            }
        }
    }
    /// Every row of one unit row against any number of tokens, [`NEON_TOKENS`] at a
    /// time.
    ///
    /// # Safety
    /// The CPU must support Advanced SIMD (NEON).
    #[cfg(target_arch = "aarch64")]
    unsafe fn group_neon(row: &[Self], acts: &[Acts], out: &mut [f32], stride: usize) {
        for (i, chunk) in acts.chunks(NEON_TOKENS).enumerate() {
            let out = &mut out[i * NEON_TOKENS * stride..];
            // SAFETY: the caller guarantees the CPU features.
            unsafe {
                match chunk {
                    [a] => Self::pass_neon(row, [a], out, stride),
                    [a, b] => Self::pass_neon(row, [a, b], out, stride),
                    [a, b, c] => Self::pass_neon(row, [a, b, c], out, stride),
                    [a, b, c, d] => Self::pass_neon(row, [a, b, c, d], out, stride),
                    _ => unreachable!("passes hold 1 to {NEON_TOKENS} tokens"),
                }
            }
        }
    }

    /// `R` unit rows (`R × ROWS` rows) against `T` tokens into `out[t * stride + r]`
    /// (token-major, as the product's output).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[Self]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        for (r, row) in rows.into_iter().enumerate() {
            for half in 0..Self::ROWS / 8 {
                let out = &mut out[r * Self::ROWS + 8 * half..];
                // SAFETY: the caller guarantees the CPU features.
                unsafe { Self::half_avx2(row, half, acts, out, stride) }
            }
        }
    }
    /// As [`WeightBlock::tile_avx2`], with 512-bit vectors.
    ///
    /// # Safety
    /// The CPU must support what [`Simd::Avx512`] requires.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[Self]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    ) {
        for (r, row) in rows.into_iter().enumerate() {
            // SAFETY: the caller guarantees the CPU features.
            unsafe { Self::group_avx512(row, acts, &mut out[r * Self::ROWS..], stride) }
        }
    }
    /// As [`WeightBlock::tile_avx2`] with Arm's 128-bit vectors, for any number of
    /// tokens.
    ///
    /// # Safety
    /// The CPU must support Advanced SIMD (NEON).
    #[cfg(target_arch = "aarch64")]
    unsafe fn tile_neon<const R: usize>(
        rows: [&[Self]; R],
        acts: &[Acts],
        out: &mut [f32],
        stride: usize,
    ) {
        for (r, row) in rows.into_iter().enumerate() {
            // SAFETY: the caller guarantees the CPU features.
            unsafe { Self::group_neon(row, acts, &mut out[r * Self::ROWS..], stride) }
        }
    }
}

/// Implements [`WeightBlock::half_avx2`] and [`WeightBlock::group_avx512`] by a
/// type's kernel functions of those signatures (which enable the CPU features).
macro_rules! avx_kernels {
    ($half:path, $group:path) => {
        #[cfg(target_arch = "x86_64")]
        unsafe fn half_avx2<const T: usize>(
            row: &[Self],
            half: usize,
            acts: [&Acts; T],
            out: &mut [f32],
            stride: usize,
        ) {
            // SAFETY: the caller guarantees the CPU features.
            unsafe { $half(row, half, acts, out, stride) }
        }

        #[cfg(target_arch = "x86_64")]
        unsafe fn group_avx512<const T: usize>(
            row: &[Self],
            acts: [&Acts; T],
            out: &mut [f32],
            stride: usize,
        ) {
            // SAFETY: the caller guarantees the CPU features.
            unsafe { $group(row, acts, out, stride) }
        }
    };
}
pub(crate) use avx_kernels;

/// Implements [`WeightBlock::pass_neon`] by a type's kernel function of that signature
/// (which enables NEON).
macro_rules! neon_kernel {
    ($pass:path) => {
        #[cfg(target_arch = "aarch64")]
        unsafe fn pass_neon<const T: usize>(
            row: &[Self],
            acts: [&Acts; T],
            out: &mut [f32],
            stride: usize,
        ) {
            // SAFETY: the caller guarantees the CPU features.
            unsafe { $pass(row, acts, out, stride) }
        }
    };
}
pub(crate) use neon_kernel;

pub struct Matrix<B> {
    rows: usize,
    cols: usize,
    /// `rows.div_ceil(B::ROWS) × cols / B::VALUES` units, unit row by unit row, in
    /// huge-page-backed memory.
    blocks: Blocks<B>,
    simd: Simd,
}

impl<B: WeightBlock> Matrix<B> {
    /// The blocks of a tensor of shape `[rows, cols]` and type `B::DTYPE`.
    pub fn from_stored(t: &StoredTensor) -> Result<Self> {
        Self::stack(&[t])
    }

    /// One matrix holding the rows of `parts` in order; the parts must share their
    /// row length.
    pub fn stack(parts: &[&StoredTensor]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("no matrices to stack");
        };
        let cols = first.dims2()?.1;
        if cols == 0 || cols % B::VALUES != 0 {
            bail!("{:?} rows of {cols} values are not whole blocks", B::DTYPE);
        }
        if let Some(part) = parts.iter().find(|p| p.dtype != B::DTYPE) {
            bail!("expected a {:?} tensor, got {:?}", B::DTYPE, part.dtype);
        }
        // Every row's bytes in order, then unit rows from them; sized exactly up front:
        // these blocks are most of a node's memory.
        let total_rows: usize = parts
            .iter()
            .map(|p| p.dims2().map_or(0, |(r, _)| r))
            .fold(0, usize::saturating_add);
        let mut all_rows: Vec<&[u8]> = Vec::with_capacity(total_rows);
        for part in parts {
            let bytes = &part.bytes;
            let (part_rows, part_cols) = part.dims2()?;
            if part_cols != cols {
                bail!("stacked matrices must have equal row lengths");
            }
            let expected = part_rows.checked_mul(cols).map(|n| n / B::VALUES);
            let Some(expected) = expected.filter(|n| n.checked_mul(B::BYTES).is_some()) else {
                bail!(
                    "{:?} matrix of {part_rows} rows of {cols} overflows",
                    B::DTYPE
                );
            };
            if bytes.len() != expected * B::BYTES {
                bail!(
                    "{:?} tensor holds {} bytes, expected {} blocks",
                    B::DTYPE,
                    bytes.len(),
                    expected
                );
            }
            all_rows.extend(bytes.chunks_exact(cols / B::VALUES * B::BYTES));
        }
        // Every part's blocks were checked above; the padding to whole units is less
        // than B::ROWS rows more.
        let Some(block_count) = all_rows
            .len()
            .div_ceil(B::ROWS)
            .checked_mul(cols)
            .map(|n| n / B::VALUES)
        else {
            bail!("{:?} matrix of {} rows overflows", B::DTYPE, all_rows.len());
        };
        let mut blocks = Placing::new(block_count);
        let mut unit = Vec::with_capacity(cols / B::VALUES);
        for unit_row in all_rows.chunks(B::ROWS) {
            unit.clear();
            B::parse_rows(unit_row, &mut unit);
            blocks.extend(&unit);
        }
        let rows = all_rows.len();
        Ok(Self {
            rows,
            cols,
            blocks: blocks.finish(),
            simd: Simd::cached(),
        })
    }

    /// The same matrix computed on `path` (for tests of each path).
    #[cfg(test)]
    pub fn on(self, path: Simd) -> Self {
        Self { simd: path, ..self }
    }

    pub fn simd(&self) -> Simd {
        self.simd
    }

    /// Bytes the blocks of a `[rows, cols]` matrix take.
    pub fn bytes_for(rows: usize, cols: usize) -> u64 {
        let units = rows.div_ceil(B::ROWS) as u64 * (cols / B::VALUES) as u64;
        units * std::mem::size_of::<B>() as u64
    }

    /// Bytes this matrix's blocks take.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        (self.blocks.len() * std::mem::size_of::<B>()) as u64
    }

    /// Unit row `i`: rows `i × B::ROWS..` of the matrix.
    pub fn unit_row(&self, i: usize) -> &[B] {
        let per_row = self.cols / B::VALUES;
        &self.blocks[i * per_row..(i + 1) * per_row]
    }

    /// Rows `ids`, dequantized: `[ids.len(), cols]` (an embedding lookup).
    pub fn rows_of(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                bail!("row {id} of a matrix of {} rows", self.rows);
            }
            for block in self.unit_row(id / B::ROWS) {
                block.dequantize(id % B::ROWS, &mut out);
            }
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)
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
        let out = crate::model::with_values(x, |x| matmul(self, x, self.rows, self.cols))?;
        Tensor::from_vec(out, dims, &Device::Cpu)
    }

    /// `x`: `[batch, seq, cols]` → `[batch, seq, rows]`.
    pub fn apply(&self, x: &Hidden) -> Result<Hidden> {
        if x.width() != self.cols {
            bail!(
                "rows of {} values for a matrix of {} columns",
                x.width(),
                self.cols
            );
        }
        x.with_rows(matmul(self, x.values(), self.rows, self.cols), self.rows)
    }
}
