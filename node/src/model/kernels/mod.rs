//! Matrix kernels for quantized weights that candle runs slowly on plain builds.
//!
//! candle 0.11 computes Q4_1 × Q8_1 dot products with scalar code unless the whole
//! binary is built for the host CPU. [`q4_1`] keeps candle's exact arithmetic (so
//! results are bit-identical to its scalar path) but computes each block's integer
//! dot product with AVX2 when the CPU has it, chosen at run time.

pub mod q4_1;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

/// A weight matrix of a transformer block.
pub enum Linear {
    /// Any quantization candle supports, computed by candle.
    Candle(QMatMul),
    /// Q4_1, computed by [`q4_1::Q4_1Matrix`].
    Q4_1(q4_1::Q4_1Matrix),
}

impl Linear {
    pub fn new(weights: QTensor) -> Result<Self> {
        match weights.dtype() {
            GgmlDType::Q4_1 => Ok(Linear::Q4_1(q4_1::Q4_1Matrix::from_qtensor(&weights)?)),
            _ => Ok(Linear::Candle(QMatMul::from_qtensor(weights)?)),
        }
    }

    /// `x`: `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Q4_1(m) => m.forward(x),
        }
    }
}
