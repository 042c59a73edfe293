//! RMS norms: of every row of the hidden states (before a sublayer, before the LM
//! head), and of each query and key head before RoPE where an architecture norms
//! heads (Qwen 3).

use candle_core::Result;

use super::load::{load_vector, LoadResult};
use crate::model::gguf::GgufFile;
use crate::model::kernels::rms_norm;
use crate::model::Hidden;

/// Rows per task when a norm is split over the compute threads; up to this many rows
/// run on the calling thread alone (eight rows take one or two microseconds).
const NORM_ROWS_PER_TASK: usize = 32;

/// An RMS norm ([`kernels::rms_norm`](crate::model::kernels::rms_norm)); its weight,
/// dequantized to f32 (it is tiny).
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(gguf: &mut GgufFile, name: &str, size: usize, eps: f32) -> LoadResult<Self> {
        let weight = load_vector(gguf, name, size)?;
        Ok(Self { weight, eps })
    }

    /// The norm of each row of `x`.
    pub fn forward(&self, x: &Hidden) -> Result<Hidden> {
        let size = self.weight.len();
        if x.width() != size || size == 0 {
            candle_core::bail!("rows of {size} values expected, got {:?}", x.dims());
        }
        x.map_rows(size, NORM_ROWS_PER_TASK, |x, y| {
            rms_norm(x, &self.weight, self.eps, y)
        })
    }

    /// The norm of one row `x` into `out`, on the calling thread.
    pub fn forward_row(&self, x: &[f32], out: &mut [f32]) {
        rms_norm(x, &self.weight, self.eps, out)
    }

    /// `y + x` (the residual stream after a sublayer, in `y`'s memory) and its norm.
    pub fn add_forward(&self, x: &Hidden, mut y: Hidden) -> Result<(Hidden, Hidden)> {
        y.add(x)?;
        let normed = self.forward(&y)?;
        Ok((y, normed))
    }
}

/// Per-head RMS norms of queries and of keys (`head_dim` weights each), applied before
/// RoPE.
pub struct HeadNorms {
    pub q: RmsNorm,
    pub k: RmsNorm,
}

impl HeadNorms {
    /// `blk.{index}.attn_q_norm.weight` and `blk.{index}.attn_k_norm.weight`.
    pub fn load(gguf: &mut GgufFile, index: usize, head_dim: usize, eps: f32) -> LoadResult<Self> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        Ok(Self {
            q: RmsNorm::load(gguf, &name("attn_q_norm"), head_dim, eps)?,
            k: RmsNorm::load(gguf, &name("attn_k_norm"), head_dim, eps)?,
        })
    }
}
