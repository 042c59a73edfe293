//! Hidden states on the wire: a shape, an element type and little-endian bytes.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Most elements one wire tensor may carry (64 Mi floats = 256 MiB at f32).
/// Checked before any buffer is sized from a peer's shape.
pub const MAX_TENSOR_ELEMENTS: usize = 64 * 1024 * 1024;
/// Most dimensions a wire tensor may have.
pub const MAX_TENSOR_RANK: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDType {
    F32,
    F16,
    BF16,
}

impl WireDType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::BF16 => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    pub shape: Vec<u32>,
    pub dtype: WireDType,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TensorError {
    #[error("tensor has rank {0}; at most {MAX_TENSOR_RANK} dimensions are allowed")]
    Rank(usize),
    #[error("tensor shape {0:?} has more than {MAX_TENSOR_ELEMENTS} elements")]
    TooLarge(Vec<u32>),
    #[error("tensor of shape {shape:?} and type {dtype:?} needs {expected} bytes, got {actual}")]
    Length {
        shape: Vec<u32>,
        dtype: WireDType,
        expected: usize,
        actual: usize,
    },
    #[error("tensor holds a non-finite value (NaN or infinity) at element {0}")]
    NonFinite(usize),
    #[error("tensor data has {values} values, which does not fit shape {shape:?}")]
    ShapeMismatch { shape: Vec<u32>, values: usize },
}

/// Number of elements of `shape`, refusing shapes over the limits without overflowing.
pub fn element_count(shape: &[u32]) -> Result<usize, TensorError> {
    if shape.len() > MAX_TENSOR_RANK {
        return Err(TensorError::Rank(shape.len()));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
        .ok_or_else(|| TensorError::TooLarge(shape.to_vec()))
}

impl WireTensor {
    /// Encodes `values` (row-major, of `shape`) as `dtype`.
    pub fn from_f32(shape: &[u32], values: &[f32], dtype: WireDType) -> Result<Self, TensorError> {
        if element_count(shape)? != values.len() {
            return Err(TensorError::ShapeMismatch {
                shape: shape.to_vec(),
                values: values.len(),
            });
        }
        let mut data = Vec::with_capacity(values.len() * dtype.size_in_bytes());
        match dtype {
            WireDType::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            WireDType::F16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            WireDType::BF16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            data,
        })
    }

    /// Checks that the byte length matches the shape and type. Cheap: no allocation.
    pub fn validate(&self) -> Result<usize, TensorError> {
        let elements = element_count(&self.shape)?;
        let expected = elements * self.dtype.size_in_bytes();
        if self.data.len() != expected {
            return Err(TensorError::Length {
                shape: self.shape.clone(),
                dtype: self.dtype,
                expected,
                actual: self.data.len(),
            });
        }
        Ok(elements)
    }

    /// Decodes to f32, refusing malformed lengths and non-finite values.
    pub fn to_f32(&self) -> Result<Vec<f32>, TensorError> {
        let elements = self.validate()?;
        let mut out = Vec::with_capacity(elements);
        match self.dtype {
            WireDType::F32 => out.extend(
                self.data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            WireDType::F16 => out.extend(
                self.data
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            WireDType::BF16 => out.extend(
                self.data
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(TensorError::NonFinite(i));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_is_exact() {
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.37 - 2.0).collect();
        let t = WireTensor::from_f32(&[1, 2, 6], &v, WireDType::F32).unwrap();
        assert_eq!(t.data.len(), 48);
        assert_eq!(t.to_f32().unwrap(), v);
    }

    #[test]
    fn half_types_round_within_their_precision() {
        let v = vec![1.0f32, -0.5, 3.140625, 1000.0];
        for dtype in [WireDType::F16, WireDType::BF16] {
            let t = WireTensor::from_f32(&[4], &v, dtype).unwrap();
            assert_eq!(t.data.len(), 8);
            for (a, b) in t.to_f32().unwrap().iter().zip(&v) {
                assert!((a - b).abs() <= b.abs() / 128.0, "{dtype:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rejects_malformed_tensors() {
        let t = WireTensor {
            shape: vec![2, 3],
            dtype: WireDType::F32,
            data: vec![0; 20],
        };
        assert!(matches!(t.to_f32(), Err(TensorError::Length { .. })));
        let huge = WireTensor {
            shape: vec![u32::MAX, u32::MAX, u32::MAX],
            dtype: WireDType::F32,
            data: vec![],
        };
        assert!(matches!(huge.validate(), Err(TensorError::TooLarge(_))));
        let nan = WireTensor::from_f32(&[2], &[1.0, f32::NAN], WireDType::F32).unwrap();
        assert_eq!(nan.to_f32(), Err(TensorError::NonFinite(1)));
        let inf = WireTensor::from_f32(&[1], &[f32::INFINITY], WireDType::F16).unwrap();
        assert_eq!(inf.to_f32(), Err(TensorError::NonFinite(0)));
        assert!(matches!(
            WireTensor::from_f32(&[3], &[1.0], WireDType::F32),
            Err(TensorError::ShapeMismatch { .. })
        ));
    }
}
