//! Hidden states on the wire: a shape, an element type and little-endian bytes.

use std::borrow::Cow;

use half::{bf16, f16};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// Hidden states as they travel: a shape, the element type on the wire, and the
/// values. On the wire the values are `dtype`'s little-endian bytes; in memory they are
/// f32, borrowed where a sender already holds them (encoding writes straight from
/// them) and owned after decoding (decoding converts the frame's bytes straight into
/// them). So a hidden state is copied once into a frame and once out of one.
#[derive(Clone, Debug, PartialEq)]
pub struct WireTensor<'a> {
    pub shape: Vec<u32>,
    pub dtype: WireDType,
    /// Row-major values, as the receiver sees them (rounded to `dtype`).
    pub values: Cow<'a, [f32]>,
}
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TensorError {
    #[error("tensor has rank {0}; at most {MAX_TENSOR_RANK} dimensions are allowed")]
    Rank(usize),
    #[error("tensor shape {0:?} has more than {MAX_TENSOR_ELEMENTS} elements")]
    TooLarge(Vec<u32>),
    #[error("tensor of shape {shape:?} needs {expected} values, got {actual}")]
    Length {
        shape: Vec<u32>,
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

impl<'a> WireTensor<'a> {
    /// `values` (row-major, of `shape`), sent as `dtype`: borrowed as they are for
    /// `F32`, rounded to what the receiver will see for the half types.
    pub fn new(shape: &[u32], values: &'a [f32], dtype: WireDType) -> Result<Self, TensorError> {
        Self::from_cow(shape, Cow::Borrowed(values), dtype)
    }

    fn from_cow(
        shape: &[u32],
        values: Cow<'a, [f32]>,
        dtype: WireDType,
    ) -> Result<Self, TensorError> {
        if element_count(shape)? != values.len() {
            return Err(TensorError::ShapeMismatch {
                shape: shape.to_vec(),
                values: values.len(),
            });
        }
        let round = |f: fn(f32) -> f32| Cow::Owned(values.iter().map(|&v| f(v)).collect());
        let values = match dtype {
            WireDType::F32 => values,
            WireDType::F16 => round(|v| f16::from_f32(v).to_f32()),
            WireDType::BF16 => round(|v| bf16::from_f32(v).to_f32()),
        };
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            values,
        })
    }

    /// The same tensor, borrowing this one's values.
    pub fn view(&self) -> WireTensor<'_> {
        WireTensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            values: Cow::Borrowed(&self.values),
        }
    }

    /// The same tensor owning its values (copied only if borrowed).
    pub fn into_owned(self) -> WireTensor<'static> {
        WireTensor {
            shape: self.shape,
            dtype: self.dtype,
            values: Cow::Owned(self.values.into_owned()),
        }
    }

    /// Bytes the values take on the wire.
    pub fn wire_bytes(&self) -> usize {
        self.values.len() * self.dtype.size_in_bytes()
    }

    /// Checks that the values fill the shape and are all finite. No allocation.
    pub fn validate(&self) -> Result<usize, TensorError> {
        let elements = element_count(&self.shape)?;
        if self.values.len() != elements {
            return Err(TensorError::Length {
                shape: self.shape.clone(),
                expected: elements,
                actual: self.values.len(),
            });
        }
        if let Some(i) = self.values.iter().position(|v| !v.is_finite()) {
            return Err(TensorError::NonFinite(i));
        }
        Ok(elements)
    }

    /// The values, once validated; no copy unless they were borrowed.
    pub fn to_f32(self) -> Result<Vec<f32>, TensorError> {
        self.validate()?;
        Ok(self.values.into_owned())
    }
}

impl WireTensor<'static> {
    /// An owning tensor of a copy of `values` (row-major, of `shape`), sent as `dtype`.
    pub fn from_f32(shape: &[u32], values: &[f32], dtype: WireDType) -> Result<Self, TensorError> {
        Ok(WireTensor::new(shape, values, dtype)?.into_owned())
    }

    /// An owning tensor of `values` (row-major, of `shape`), sent as `dtype`; the
    /// values are kept without a copy for `F32`.
    pub fn from_vec(
        shape: &[u32],
        values: Vec<f32>,
        dtype: WireDType,
    ) -> Result<Self, TensorError> {
        Self::from_cow(shape, Cow::Owned(values), dtype)
    }
}

/// On the wire: the shape, the type, then the values as one byte string (bincode: a
/// length, then the bytes), as a struct of these three fields.
impl Serialize for WireTensor<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("WireTensor", 3)?;
        s.serialize_field("shape", &self.shape)?;
        s.serialize_field("dtype", &self.dtype)?;
        s.serialize_field(
            "data",
            &Encoded {
                values: &self.values,
                dtype: self.dtype,
            },
        )?;
        s.end()
    }
}

struct Encoded<'v> {
    values: &'v [f32],
    dtype: WireDType,
}

impl Serialize for Encoded<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.dtype {
            // f32 values are their own little-endian bytes: written without a copy.
            #[cfg(target_endian = "little")]
            WireDType::F32 => serializer.serialize_bytes(bytemuck::cast_slice(self.values)),
            #[cfg(not(target_endian = "little"))]
            WireDType::F32 => {
                let bytes: Vec<u8> = self.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                serializer.serialize_bytes(&bytes)
            }
            WireDType::F16 => {
                let bytes: Vec<u8> = (self.values.iter())
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect();
                serializer.serialize_bytes(&bytes)
            }
            WireDType::BF16 => {
                let bytes: Vec<u8> = (self.values.iter())
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect();
                serializer.serialize_bytes(&bytes)
            }
        }
    }
}

/// Decodes `bytes` of `dtype` into f32 values: the one copy out of a frame. The
/// values are not checked against the shape here (see [`WireTensor::validate`]), so a
/// server can answer a wrong shape as a bad tensor rather than a broken frame.
fn decode_values(bytes: &[u8], dtype: WireDType) -> Result<Vec<f32>, String> {
    let size = dtype.size_in_bytes();
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes are not whole {dtype:?} values",
            bytes.len()
        ));
    }
    Ok(match dtype {
        WireDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        WireDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        WireDType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}

impl<'de> Deserialize<'de> for WireTensor<'_> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_struct("WireTensor", &["shape", "dtype", "data"], TensorVisitor)
    }
}

struct TensorVisitor;

impl<'de> Visitor<'de> for TensorVisitor {
    type Value = WireTensor<'static>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a tensor: shape, type and data")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let missing = |what| de::Error::custom(format!("tensor without its {what}"));
        let shape: Vec<u32> = seq
            .next_element_seed(crate::bounded::Bounded::new(MAX_TENSOR_RANK))?
            .ok_or_else(|| missing("shape"))?;
        let dtype: WireDType = seq.next_element()?.ok_or_else(|| missing("type"))?;
        let values = seq
            .next_element_seed(ValuesSeed(dtype))?
            .ok_or_else(|| missing("data"))?;
        Ok(WireTensor {
            shape,
            dtype,
            values: Cow::Owned(values),
        })
    }
}

/// Reads the data field straight into f32 values of a known type.
struct ValuesSeed(WireDType);

impl<'de> DeserializeSeed<'de> for ValuesSeed {
    type Value = Vec<f32>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<f32>, D::Error> {
        deserializer.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for ValuesSeed {
    type Value = Vec<f32>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "the bytes of {:?} values", self.0)
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<f32>, E> {
        decode_values(bytes, self.0).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    fn round_trip(t: &WireTensor) -> WireTensor<'static> {
        decode(&encode(t).unwrap()).unwrap()
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.37 - 2.0).collect();
        let t = WireTensor::new(&[1, 2, 6], &v, WireDType::F32).unwrap();
        assert_eq!(t.wire_bytes(), 48);
        assert!(matches!(t.values, Cow::Borrowed(_)));
        assert_eq!(round_trip(&t).to_f32().unwrap(), v);
    }

    #[test]
    fn half_types_round_within_their_precision() {
        let v = vec![1.0f32, -0.5, 3.140625, 1000.0];
        for dtype in [WireDType::F16, WireDType::BF16] {
            let t = WireTensor::from_f32(&[4], &v, dtype).unwrap();
            assert_eq!(t.wire_bytes(), 8);
            for (a, b) in t.values.iter().zip(&v) {
                assert!((a - b).abs() <= b.abs() / 128.0, "{dtype:?}: {a} vs {b}");
            }
            // The values are what arrives, and encode to the same bytes again.
            let back = round_trip(&t);
            assert_eq!(back, t);
            assert_eq!(encode(&back).unwrap(), encode(&t).unwrap());
        }
    }

    #[test]
    fn the_wire_format_is_shape_type_then_bytes() {
        let t = WireTensor::from_f32(&[2], &[1.0, -2.0], WireDType::F32).unwrap();
        let mut expected = vec![1, 2, 0, 8];
        expected.extend_from_slice(&1.0f32.to_le_bytes());
        expected.extend_from_slice(&(-2.0f32).to_le_bytes());
        assert_eq!(encode(&t).unwrap(), expected);
    }

    #[test]
    fn rejects_malformed_tensors() {
        let t = WireTensor {
            shape: vec![2, 3],
            dtype: WireDType::F32,
            values: Cow::Owned(vec![0.0; 5]),
        };
        assert!(matches!(t.validate(), Err(TensorError::Length { .. })));
        assert!(matches!(t.to_f32(), Err(TensorError::Length { .. })));
        let huge = WireTensor {
            shape: vec![u32::MAX, u32::MAX, u32::MAX],
            dtype: WireDType::F32,
            values: Cow::Owned(vec![]),
        };
        assert!(matches!(huge.validate(), Err(TensorError::TooLarge(_))));
        let nan = WireTensor::from_f32(&[2], &[1.0, f32::NAN], WireDType::F32).unwrap();
        assert_eq!(nan.to_f32(), Err(TensorError::NonFinite(1)));
        let inf =
            round_trip(&WireTensor::from_f32(&[1], &[f32::INFINITY], WireDType::F16).unwrap());
        assert_eq!(inf.to_f32(), Err(TensorError::NonFinite(0)));
        assert!(matches!(
            WireTensor::from_f32(&[3], &[1.0], WireDType::F32),
            Err(TensorError::ShapeMismatch { .. })
        ));
        // A shape of more dimensions than allowed is refused as it is read.
        let deep = WireTensor {
            shape: vec![1; MAX_TENSOR_RANK + 1],
            dtype: WireDType::F32,
            values: Cow::Owned(vec![0.0]),
        };
        assert!(decode::<WireTensor>(&encode(&deep).unwrap()).is_err());
        // Bytes that are not whole values are a malformed message.
        let ragged = [1, 1, 0, 3, 0, 0, 0];
        assert!(decode::<WireTensor>(&ragged).is_err());
    }
}
