//! The ggml tensor types this version reads, by their code in a GGUF file. candle
//! holds most of them (and computes the ones without kernels of our own); the rest
//! (IQ4_NL) only this crate's kernels compute, so the file's types are named by
//! this enum and turned into candle's only where candle loads or computes a tensor.

use candle_core::quantized::{ggml_file, GgmlDType, QTensor};
use candle_core::{Device, Result};

#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ4_NL,
    BF16,
}

impl TensorType {
    /// Every type, in the order of their codes.
    pub const ALL: [TensorType; 16] = [
        TensorType::F32,
        TensorType::F16,
        TensorType::Q4_0,
        TensorType::Q4_1,
        TensorType::Q5_0,
        TensorType::Q5_1,
        TensorType::Q8_0,
        TensorType::Q8_1,
        TensorType::Q2K,
        TensorType::Q3K,
        TensorType::Q4K,
        TensorType::Q5K,
        TensorType::Q6K,
        TensorType::Q8K,
        TensorType::IQ4_NL,
        TensorType::BF16,
    ];

    /// The type's code in a GGUF file (ggml's `ggml_type`).
    pub fn code(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4_0 => 2,
            TensorType::Q4_1 => 3,
            TensorType::Q5_0 => 6,
            TensorType::Q5_1 => 7,
            TensorType::Q8_0 => 8,
            TensorType::Q8_1 => 9,
            TensorType::Q2K => 10,
            TensorType::Q3K => 11,
            TensorType::Q4K => 12,
            TensorType::Q5K => 13,
            TensorType::Q6K => 14,
            TensorType::Q8K => 15,
            TensorType::IQ4_NL => 20,
            TensorType::BF16 => 30,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// candle's name for the type, where candle has one.
    pub fn candle(self) -> Option<GgmlDType> {
        Some(match self {
            TensorType::F32 => GgmlDType::F32,
            TensorType::F16 => GgmlDType::F16,
            TensorType::Q4_0 => GgmlDType::Q4_0,
            TensorType::Q4_1 => GgmlDType::Q4_1,
            TensorType::Q5_0 => GgmlDType::Q5_0,
            TensorType::Q5_1 => GgmlDType::Q5_1,
            TensorType::Q8_0 => GgmlDType::Q8_0,
            TensorType::Q8_1 => GgmlDType::Q8_1,
            TensorType::Q2K => GgmlDType::Q2K,
            TensorType::Q3K => GgmlDType::Q3K,
            TensorType::Q4K => GgmlDType::Q4K,
            TensorType::Q5K => GgmlDType::Q5K,
            TensorType::Q6K => GgmlDType::Q6K,
            TensorType::Q8K => GgmlDType::Q8K,
            TensorType::BF16 => GgmlDType::BF16,
            TensorType::IQ4_NL => return None,
        })
    }

    /// The type of a tensor candle holds.
    pub fn of_candle(dtype: GgmlDType) -> Self {
        Self::ALL
            .into_iter()
            .find(|t| t.candle() == Some(dtype))
            .expect("every type candle holds is listed")
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self.candle() {
            Some(dtype) => dtype.block_size(),
            None => 32,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self.candle() {
            Some(dtype) => dtype.type_size(),
            // IQ4_NL: an f16 scale and 32 four-bit indices.
            None => 18,
        }
    }

    /// The type as llama.cpp names it, with its code, for messages.
    pub fn name(self) -> String {
        crate::model::gguf::ggml_type_name(self.code())
    }
}

/// One tensor's bytes as the file stores them, with their type and shape (candle's
/// order: outermost dimension first).
pub struct StoredTensor {
    pub dtype: TensorType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StoredTensor {
    /// The tensor as candle holds it, for what candle computes; an error naming the
    /// type where candle has no such type.
    pub fn to_candle(&self) -> Result<QTensor> {
        let Some(dtype) = self.dtype.candle() else {
            candle_core::bail!("candle cannot hold a tensor of type {}", self.dtype.name());
        };
        ggml_file::qtensor_from_ggml(dtype, &self.bytes, self.shape.clone(), &Device::Cpu)
    }

    /// `(rows, columns)` of a matrix.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape[..] {
            [rows, cols] => Ok((rows, cols)),
            _ => candle_core::bail!("expected a matrix, got shape {:?}", self.shape),
        }
    }

    /// A tensor candle made (in tests, which quantize with candle).
    #[cfg(test)]
    pub fn of_candle(q: &QTensor) -> Self {
        StoredTensor {
            dtype: TensorType::of_candle(q.dtype()),
            shape: q.shape().dims().to_vec(),
            bytes: q.data().unwrap().into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_candle_names_round_trip() {
        for t in TensorType::ALL {
            assert_eq!(TensorType::from_code(t.code()), Some(t));
            if let Some(dtype) = t.candle() {
                assert_eq!(TensorType::of_candle(dtype), t);
            }
        }
        assert_eq!(TensorType::from_code(20), Some(TensorType::IQ4_NL));
        assert_eq!(TensorType::IQ4_NL.name(), "IQ4_NL (ggml type 20)");
        assert_eq!(TensorType::from_code(16), None);
    }
}
