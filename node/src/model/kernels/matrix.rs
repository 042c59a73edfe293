//! A weight matrix of quantized blocks, whatever the block type: reading it from GGUF
//! tensors, dequantizing rows, and multiplying it with activations through the
//! block type's kernels ([`WeightBlock`]). A block type may hold more than one of the
//! file's 32-value blocks, laid out for its kernels (Q4_1 keeps pairs).

// The SIMD kernels of a block type are `unsafe` to call (CPU features).
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Device, Result, Tensor};

use super::activations::Acts;
use super::driver::matmul;
use super::{Simd, BLOCK};

/// A unit of quantized weights (one or more 32-value blocks of the file), and the
/// kernels that multiply rows of them.
///
/// The arithmetic every path performs, per row and token: block `b` adds to one of two
/// groups of eight f32 lanes (`b % 2`); lane `l` of a block is the exact integer sum of
/// its products `4l..4l + 4`, added as `acc = fma(d_w × d_x, lane, acc)`. Per-block
/// offsets (Q4_1's `m_w × s_x`) go to two scalars the same way, as `fma(m, s, acc)`.
/// [`super::driver::finish`] adds the groups. So the result is one fixed sequence of
/// operations.
pub trait WeightBlock: Copy + Send + Sync + 'static {
    const DTYPE: GgmlDType;
    /// Bytes of one 32-value block in the file.
    const BYTES: usize;
    /// Values one unit holds: a row of `cols` values takes `cols.div_ceil(VALUES)`
    /// units, the last one padded with zero blocks.
    const VALUES: usize;
    /// Whether activations carry Q8_1 block sums.
    const SUMS: bool;

    /// Appends the units of one row, from its whole blocks as stored in the file.
    fn parse_row(bytes: &[u8], out: &mut Vec<Self>);
    /// Appends the unit's `VALUES` values.
    fn dequantize(&self, out: &mut Vec<f32>);
    /// One output, in plain Rust.
    fn dot_portable(row: &[Self], act: &Acts) -> f32;
    /// `R` rows against `T` tokens into `out[r * stride + t]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2<const R: usize, const T: usize>(
        rows: [&[Self]; R],
        acts: [&Acts; T],
        out: &mut [f32],
        stride: usize,
    );
    /// As [`WeightBlock::tile_avx2`], two blocks per 512-bit vector; `sums` as in
    /// [`super::driver::Tile`].
    ///
    /// # Safety
    /// The CPU must support what [`Simd::Avx512`] requires.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx512<const R: usize, const T: usize>(
        rows: [&[Self]; R],
        acts: [&Acts; T],
        sums: &[[f32; 16]],
        out: &mut [f32],
        stride: usize,
    );
}

pub struct Matrix<B> {
    rows: usize,
    cols: usize,
    /// `rows × cols.div_ceil(B::VALUES)` units, row-major.
    blocks: Vec<B>,
    simd: Simd,
}

impl<B: WeightBlock> Matrix<B> {
    /// The blocks of a tensor of shape `[rows, cols]` and type `B::DTYPE`.
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        Self::stack(&[t])
    }

    /// One matrix holding the rows of `parts` in order; the parts must share their
    /// row length.
    pub fn stack(parts: &[&QTensor]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("no matrices to stack");
        };
        let cols = first.shape().dims2()?.1;
        if cols % BLOCK != 0 {
            bail!("{:?} rows of {cols} values are not whole blocks", B::DTYPE);
        }
        let mut rows = 0;
        // Sized exactly up front: these blocks are most of a node's memory.
        let total_rows: usize = parts
            .iter()
            .map(|p| p.shape().dims2().map_or(0, |(r, _)| r))
            .sum();
        let mut blocks = Vec::with_capacity(total_rows * cols.div_ceil(B::VALUES));
        for part in parts {
            if part.dtype() != B::DTYPE {
                bail!("expected a {:?} tensor, got {:?}", B::DTYPE, part.dtype());
            }
            let (part_rows, part_cols) = part.shape().dims2()?;
            if part_cols != cols {
                bail!("stacked matrices must have equal row lengths");
            }
            let bytes = part.data()?;
            let expected = part_rows * cols / BLOCK;
            if bytes.len() != expected * B::BYTES {
                bail!(
                    "{:?} tensor holds {} bytes, expected {} blocks",
                    B::DTYPE,
                    bytes.len(),
                    expected
                );
            }
            for row in bytes.chunks_exact(cols / BLOCK * B::BYTES) {
                B::parse_row(row, &mut blocks);
            }
            rows += part_rows;
        }
        Ok(Self {
            rows,
            cols,
            blocks,
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

    pub fn row(&self, r: usize) -> &[B] {
        let per_row = self.cols.div_ceil(B::VALUES);
        &self.blocks[r * per_row..(r + 1) * per_row]
    }

    /// Rows `ids`, dequantized: `[ids.len(), cols]` (an embedding lookup).
    pub fn rows_of(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                bail!("row {id} of a matrix of {} rows", self.rows);
            }
            let end = out.len() + self.cols;
            for block in self.row(id) {
                block.dequantize(&mut out);
            }
            out.truncate(end);
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)
    }

    /// `x`: `[..., cols]` → `[..., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul(self, x, self.rows, self.cols)
    }
}
