//! Opening a GGUF file: header and metadata only, with checks that turn a wrong,
//! truncated or unsupported file into an error that names the problem. Tensor data
//! is read later, one tensor at a time, so a shard reads only its own layers.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

use super::gguf_header::{self, Content, HeaderError, TensorInfo};
use super::tensor_type::{StoredTensor, TensorType};
use super::ModelError;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// An open GGUF file whose header has been read and checked.
pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    content: Content,
    tensor_bytes_read: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io_err = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let mut reader = BufReader::new(file);

        let mut magic = [0u8; 4];
        if reader.read_exact(&mut magic).is_err() || &magic != GGUF_MAGIC {
            return Err(ModelError::NotGguf(path.to_path_buf()));
        }
        reader.rewind().map_err(io_err)?;

        let content = gguf_header::read(&mut reader, gguf_header::HEADER_MEMORY_LIMIT)
            .map_err(|e| header_error(path, e))?;
        check_tensor_extents(path, &content, file_len)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            content,
            tensor_bytes_read: 0,
        })
    }

    /// A file of tensor data alone, laid out as `content` says (its header came from
    /// elsewhere: a model's manifest), checked like a whole file.
    pub fn from_content(path: &Path, content: Content) -> Result<Self, ModelError> {
        let io_err = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        check_tensor_extents(path, &content, file_len)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::new(file),
            content,
            tensor_bytes_read: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.content.metadata.keys().map(String::as_str)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.content.tensor_infos.get(name)
    }

    /// Reads one tensor's bytes from disk (and nothing else).
    pub fn tensor(&mut self, name: &str) -> Result<StoredTensor, ModelError> {
        let (Some(info), Some(start)) = (self.tensor_info(name), self.tensor_start(name)) else {
            return Err(ModelError::MissingTensor(name.to_string()));
        };
        // Within the file, checked at open: it fits in memory's address space.
        let size = tensor_size(info);
        let (dtype, shape) = (info.dtype, info.shape.clone());
        let mut bytes = vec![0u8; size as usize];
        self.reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.reader.read_exact(&mut bytes))
            .map_err(|source| ModelError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.tensor_bytes_read += size;
        Ok(StoredTensor {
            dtype,
            shape,
            bytes,
        })
    }

    /// Tensor data read so far, in bytes: what a shard costs in I/O.
    pub fn tensor_bytes_read(&self) -> u64 {
        self.tensor_bytes_read
    }

    /// Where one tensor's bytes start in the file.
    pub fn tensor_start(&self, name: &str) -> Option<u64> {
        let info = self.tensor_info(name)?;
        self.content.tensor_data_offset.checked_add(info.offset)
    }

    /// Size on disk of one tensor, in bytes.
    pub fn tensor_bytes(&self, name: &str) -> u64 {
        self.tensor_info(name).map_or(0, tensor_size)
    }

    // ---- typed metadata accessors ----

    pub fn string(&self, key: &str) -> Result<&str, ModelError> {
        match self.metadata(key) {
            Some(gguf_file::Value::String(s)) => Ok(s),
            Some(_) => Err(ModelError::BadMetadata(key.to_string(), "a string")),
            None => Err(ModelError::MissingMetadata(key.to_string())),
        }
    }

    /// Any integer type, as GGUF writers disagree on widths.
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        use gguf_file::Value as V;
        let v = self
            .metadata(key)
            .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?;
        let n: Option<u64> = match v {
            V::U8(x) => Some(*x as u64),
            V::U16(x) => Some(*x as u64),
            V::U32(x) => Some(*x as u64),
            V::U64(x) => Some(*x),
            V::I8(x) => u64::try_from(*x).ok(),
            V::I16(x) => u64::try_from(*x).ok(),
            V::I32(x) => u64::try_from(*x).ok(),
            V::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| ModelError::BadMetadata(key.to_string(), "a non-negative integer"))
    }

    pub fn f32(&self, key: &str) -> Result<f32, ModelError> {
        match self.metadata(key) {
            Some(gguf_file::Value::F32(x)) => Ok(*x),
            Some(gguf_file::Value::F64(x)) => Ok(*x as f32),
            Some(_) => Err(ModelError::BadMetadata(key.to_string(), "a float")),
            None => Err(ModelError::MissingMetadata(key.to_string())),
        }
    }

    pub fn array(&self, key: &str) -> Result<&[gguf_file::Value], ModelError> {
        match self.metadata(key) {
            Some(gguf_file::Value::Array(a)) => Ok(a),
            Some(_) => Err(ModelError::BadMetadata(key.to_string(), "an array")),
            None => Err(ModelError::MissingMetadata(key.to_string())),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.metadata(key).is_some()
    }
}

/// Bytes a tensor's data takes; `u64::MAX` for dimensions no file could hold (a
/// hostile header's product would overflow).
fn tensor_size(info: &TensorInfo) -> u64 {
    let dtype = info.dtype;
    let elems = info
        .shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    elems
        .and_then(|n| (n / dtype.block_size() as u64).checked_mul(dtype.type_size() as u64))
        .unwrap_or(u64::MAX)
}

/// Every tensor must lie inside the file: a truncated download is caught at open,
/// not as a read error in the middle of loading.
fn check_tensor_extents(path: &Path, content: &Content, file_len: u64) -> Result<(), ModelError> {
    for (name, info) in &content.tensor_infos {
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(tensor_size(info));
        if end > file_len {
            return Err(ModelError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor {name} ends at byte {end} but the file has {file_len} bytes"
                ),
            });
        }
    }
    Ok(())
}

/// Maps the header reader's errors onto the loader's: a file cut short is a
/// truncated download, a type this version lacks is named as llama.cpp names it.
fn header_error(path: &Path, error: HeaderError) -> ModelError {
    match error {
        HeaderError::TensorType { name, code } => ModelError::UnsupportedTensorType {
            tensor: Some(name),
            dtype: ggml_type_name(code),
        },
        HeaderError::CutShort { .. } => ModelError::Truncated {
            path: path.to_path_buf(),
            detail: format!("header is cut short: {error}"),
        },
        HeaderError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ModelError::Truncated {
                path: path.to_path_buf(),
                detail: format!("header is cut short ({e})"),
            }
        }
        error => ModelError::BadHeader {
            path: path.to_path_buf(),
            problem: error,
        },
    }
}

/// The names llama.cpp gives its tensor types, for error messages.
pub fn ggml_type_name(code: u32) -> String {
    let name = match code {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("ggml type {code}"),
    };
    format!("{name} (ggml type {code})")
}

/// Weight types the shard's matrix multiplications accept: those with kernels of
/// our own, and those candle computes.
pub fn is_supported_weight_type(dtype: TensorType) -> bool {
    !matches!(dtype, TensorType::Q8_1 | TensorType::Q8K)
        && (crate::model::kernels::has_kernels(dtype) || dtype.candle().is_some())
}

/// Norm weights are small vectors kept in float.
pub fn is_supported_norm_type(dtype: TensorType) -> bool {
    matches!(dtype, TensorType::F32 | TensorType::F16 | TensorType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_sizes_past_any_file_do_not_overflow() {
        let info = |dims: Vec<usize>| TensorInfo {
            dtype: TensorType::Q4_0,
            shape: dims,
            offset: 0,
        };
        assert_eq!(tensor_size(&info(vec![64, 2])), 2 * 2 * 18);
        assert_eq!(tensor_size(&info(vec![usize::MAX, 3])), u64::MAX);
        assert_eq!(tensor_size(&info(vec![1 << 62, 1 << 10])), u64::MAX);
    }
}
