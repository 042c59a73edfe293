//! The gated feed-forward: `down(act(gate(x)) × up(x))`, with gate and up as two
//! matrices (`ffn_gate`, `ffn_up`) or fused into one `ffn_up` of twice the width, gate
//! first (Phi-3).

use candle_core::Result;

use super::load::{load_matmul, load_weights, LoadResult};
use crate::model::gguf::GgufFile;
use crate::model::kernels::{geglu as geglu_row, swiglu as swiglu_row, Linear, Simd, Stacked};
use crate::model::Hidden;

/// The per-layer tensors of the two layouts.
pub const SEPARATE_TENSORS: &[&str] = &["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"];
pub const FUSED_TENSORS: &[&str] = &["ffn_up.weight", "ffn_down.weight"];

/// The activation of the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU), in one pass with the product
    /// ([`kernels::swiglu`](crate::model::kernels::swiglu)).
    Silu,
    /// GELU, tanh form (GeGLU), through llama.cpp's f16 table
    /// ([`kernels::geglu`](crate::model::kernels::geglu)).
    Gelu,
}

pub struct GatedFfn {
    /// Gate and up side by side: two matrices or one fused.
    gate_up: Stacked,
    down: Linear,
    activation: Activation,
}

impl GatedFfn {
    /// Layer `index`'s `ffn_gate`, `ffn_up` (`ff` rows of width `d` each) and `ffn_down`.
    pub fn load_separate(
        gguf: &mut GgufFile,
        index: usize,
        (d, ff): (usize, usize),
        activation: Activation,
    ) -> LoadResult<Self> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        let gate_up = vec![
            load_weights(gguf, &name("ffn_gate"), ff, d)?,
            load_weights(gguf, &name("ffn_up"), ff, d)?,
        ];
        Ok(Self {
            gate_up: Stacked::new(gate_up)?,
            down: load_matmul(gguf, &name("ffn_down"), d, ff)?,
            activation,
        })
    }

    /// Layer `index`'s gate and up fused in `ffn_up` (`2 ff` rows), and `ffn_down`.
    pub fn load_fused(
        gguf: &mut GgufFile,
        index: usize,
        (d, ff): (usize, usize),
        activation: Activation,
    ) -> LoadResult<Self> {
        let name = |t: &str| format!("blk.{index}.{t}.weight");
        Ok(Self {
            gate_up: Stacked::new(vec![load_weights(gguf, &name("ffn_up"), 2 * ff, d)?])?,
            down: load_matmul(gguf, &name("ffn_down"), d, ff)?,
            activation,
        })
    }

    pub fn forward(&self, x: &Hidden) -> Result<Hidden> {
        let gate_up = self.gate_up.apply(x)?;
        let gated = match self.activation {
            Activation::Silu => {
                let simd = Simd::in_use();
                gated(&gate_up, |g, u, y| swiglu_row(g, u, y, simd))?
            }
            Activation::Gelu => gated(&gate_up, geglu_row)?,
        };
        self.down.apply(&gated)
    }
}

/// Rows per task when SwiGLU is split over the compute threads; up to this many rows
/// run on the calling thread alone (a row takes about a tenth of a microsecond).
const SWIGLU_ROWS_PER_TASK: usize = 16;

/// `act(gate) × up` for `[..., gate ‖ up]` (two halves of the last dimension), in one
/// pass.
fn gated(gate_up: &Hidden, act: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Result<Hidden> {
    let ff = match gate_up.width() {
        width if width > 0 && width.is_multiple_of(2) => width / 2,
        _ => candle_core::bail!(
            "gate and up expected side by side, got {:?}",
            gate_up.dims()
        ),
    };
    gate_up.map_rows(ff, SWIGLU_ROWS_PER_TASK, |x, y| {
        for (row, y) in x.chunks_exact(2 * ff).zip(y.chunks_exact_mut(ff)) {
            let (gate, up) = row.split_at(ff);
            act(gate, up, y);
        }
    })
}
