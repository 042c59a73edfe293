//! Reading a layer's or the model's tensors with their type and shape checked first,
//! so a file that lies about a tensor is refused by name before anything is computed.

use std::sync::Arc;

use candle_core::Device;

use crate::model::gguf::{self, GgufFile};
use crate::model::kernels::Linear;
use crate::model::tensor_type::{StoredTensor, TensorType};
use crate::model::ModelError;

pub type LoadResult<T> = Result<T, ModelError>;

/// Reads a tensor after checking its type and shape (candle order: `[out, in]`).
pub fn load_checked(
    gguf: &mut GgufFile,
    name: &str,
    expected: &[usize],
    type_ok: fn(TensorType) -> bool,
) -> LoadResult<StoredTensor> {
    let info = gguf
        .tensor_info(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if !type_ok(info.dtype) {
        return Err(ModelError::UnsupportedTensorType {
            tensor: Some(name.to_string()),
            dtype: info.dtype.name(),
        });
    }
    if info.shape != expected {
        return Err(ModelError::TensorShape {
            name: name.to_string(),
            actual: info.shape.clone(),
            expected: expected.to_vec(),
        });
    }
    gguf.tensor(name)
}

/// A one-dimensional tensor of `size` values (a norm's weight, a bias), in f32.
pub fn load_vector(gguf: &mut GgufFile, name: &str, size: usize) -> LoadResult<Vec<f32>> {
    let t = load_checked(gguf, name, &[size], gguf::is_supported_norm_type)?;
    Ok(t.to_candle()?.dequantize(&Device::Cpu)?.to_vec1::<f32>()?)
}

/// A weight matrix of `out` rows of `inp` values, as stored.
pub fn load_weights(
    gguf: &mut GgufFile,
    name: &str,
    out: usize,
    inp: usize,
) -> LoadResult<Arc<StoredTensor>> {
    let q = load_checked(gguf, name, &[out, inp], gguf::is_supported_weight_type)?;
    Ok(Arc::new(q))
}

/// A weight matrix ready to multiply by.
pub fn load_matmul(gguf: &mut GgufFile, name: &str, out: usize, inp: usize) -> LoadResult<Linear> {
    Ok(Linear::new(load_weights(gguf, name, out, inp)?)?)
}
