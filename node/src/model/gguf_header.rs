//! Reading a GGUF header (metadata and tensor table) from a file nobody vouches for:
//! every length is checked against the bytes the file has left and against a memory
//! budget before anything is allocated, every size is computed with checked
//! arithmetic, and values the format forbids are refused. Metadata values are
//! candle's own; the tensor table names types by [`TensorType`], which includes
//! types candle cannot hold.
//!
//! candle's reader bounds lengths by the file's size only, but a decoded value costs
//! more than its bytes on disk (an array of `u8` costs one `Value`, 32 bytes, per
//! byte), so a 1 GiB file could ask for 32 GiB; and it panics on
//! `general.alignment = 0`.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Value;

use super::tensor_type::TensorType;

/// What a header may cost in memory once decoded. The largest vocabularies known
/// (about 256k tokens with scores, types and merges) cost some tens of MiB.
pub const HEADER_MEMORY_LIMIT: u64 = 256 << 20;

/// ggml's tensors have at most four dimensions (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// GGUF arrays may nest; real files do not. The bound keeps recursion off the
/// stack's limit.
const MAX_DEPTH: usize = 16;

/// The largest alignment accepted: ggml's default is 32; a larger power of two only
/// wastes padding, and this keeps the padded offset far from overflowing.
const MAX_ALIGNMENT: u64 = 1 << 20;

const DEFAULT_ALIGNMENT: u64 = 32;

/// Memory one decoded value costs before its own heap bytes.
const VALUE_COST: u64 = std::mem::size_of::<Value>() as u64;

/// Memory one map entry costs beyond its key's bytes and its value (the key's
/// `String`, the value, and the map's own bookkeeping).
const ENTRY_COST: u64 = (std::mem::size_of::<(String, Value)>() + 16) as u64;

/// A tensor table entry: its name's `String`, its info, the map's bookkeeping and
/// its shape's dimensions.
const TENSOR_COST: u64 =
    (std::mem::size_of::<(String, TensorInfo)>() + 16 + 8 * MAX_DIMS as usize) as u64;

/// A GGUF file's header: its metadata and its tensor table.
#[derive(Debug)]
pub struct Content {
    pub metadata: HashMap<String, Value>,
    pub tensor_infos: HashMap<String, TensorInfo>,
    /// Where tensor data starts in the file; each tensor's offset is relative to it.
    pub tensor_data_offset: u64,
}

/// A tensor table entry.
#[derive(Debug)]
pub struct TensorInfo {
    pub dtype: TensorType,
    /// Outermost dimension first, as candle orders shapes.
    pub shape: Vec<usize>,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read the header: {0}")]
    Io(#[from] std::io::Error),
    #[error("the file does not start with the GGUF magic bytes")]
    Magic,
    #[error("GGUF version {0} is not supported (versions 1 to 3 are)")]
    Version(u32),
    #[error("{what} needs {needed} bytes but the file has only {left} left")]
    CutShort {
        what: String,
        needed: u64,
        left: u64,
    },
    #[error("{what} costs {cost} bytes of memory, more than the header's limit of {limit} bytes")]
    OverBudget { what: String, cost: u64, limit: u64 },
    #[error("{what} has unknown value type {code}")]
    ValueType { what: String, code: u32 },
    #[error("{what} is a bool of value {value} (only 0 and 1 are)")]
    Bool { what: String, value: u8 },
    #[error("{what} nests arrays deeper than {MAX_DEPTH}")]
    Depth { what: String },
    #[error("general.alignment is {0}: it must be a power of two from 1 to {MAX_ALIGNMENT}")]
    Alignment(i128),
    #[error("general.alignment is not an integer")]
    AlignmentType,
    #[error("tensor {name} has {count} dimensions: it must have 1 to {MAX_DIMS}")]
    Dimensions { name: String, count: u32 },
    #[error("tensor {name} has dimensions {dims:?}, whose size overflows")]
    Overflow { name: String, dims: Vec<u64> },
    #[error("tensor {name} has {elements} elements, not whole blocks of {block} for its type")]
    PartialBlock {
        name: String,
        elements: u64,
        block: u64,
    },
    #[error("tensor {name} has ggml type {code}, which this version cannot read")]
    TensorType { name: String, code: u32 },
}

/// Reads the header of the GGUF file in `reader` (from its start), decoding at most
/// `limit` bytes' worth of values.
pub fn read<R: Read + Seek>(reader: &mut R, limit: u64) -> Result<Content, HeaderError> {
    let end = reader.seek(SeekFrom::End(0))?;
    reader.seek(SeekFrom::Start(0))?;
    let mut r = Bounded {
        inner: reader,
        pos: 0,
        end,
        spent: 0,
        limit,
    };
    let magic = r.bytes_fixed::<4>("the magic bytes")?;
    if &magic != b"GGUF" {
        return Err(HeaderError::Magic);
    }
    let long = match r.u32("the version")? {
        1 => false,
        2 | 3 => true,
        v => return Err(HeaderError::Version(v)),
    };
    let tensor_count = r.length(long, "the tensor count")?;
    let kv_count = r.length(long, "the metadata count")?;
    let prefix = if long { 8 } else { 4 };
    // Each entry's smallest encoding: a key and a value type and one byte; a name,
    // a dimension count, a type and an offset.
    r.fits(kv_count, prefix + 4 + 1, "the metadata table")?;
    r.fits(tensor_count, prefix + 4 + 4 + 8, "the tensor table")?;

    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = r.string(long, "a metadata key")?;
        r.charge(ENTRY_COST, || format!("metadata {key}"))?;
        let what = format!("metadata {key}");
        let code = r.u32(&what)?;
        let value = r.value(code, long, 0, &what)?;
        metadata.insert(key, value);
    }

    let mut tensor_infos = HashMap::new();
    for _ in 0..tensor_count {
        let name = r.string(long, "a tensor name")?;
        r.charge(TENSOR_COST, || format!("tensor {name}"))?;
        let info = r.tensor_info(&name, long)?;
        tensor_infos.insert(name, info);
    }

    let alignment = alignment(&metadata)?;
    // Padding to the alignment: at most MAX_ALIGNMENT past a position in the file.
    let tensor_data_offset = r.pos.div_ceil(alignment) * alignment;
    Ok(Content {
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

/// `general.alignment`, where tensor data starts; 32 where absent.
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64, HeaderError> {
    let value: i128 = match metadata.get("general.alignment") {
        None => return Ok(DEFAULT_ALIGNMENT),
        Some(Value::U8(v)) => (*v).into(),
        Some(Value::U16(v)) => (*v).into(),
        Some(Value::U32(v)) => (*v).into(),
        Some(Value::U64(v)) => (*v).into(),
        Some(Value::I8(v)) => (*v).into(),
        Some(Value::I16(v)) => (*v).into(),
        Some(Value::I32(v)) => (*v).into(),
        Some(Value::I64(v)) => (*v).into(),
        Some(_) => return Err(HeaderError::AlignmentType),
    };
    match u64::try_from(value) {
        Ok(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => Ok(a),
        _ => Err(HeaderError::Alignment(value)),
    }
}

/// A reader that knows how many bytes the file has left and what the decoded
/// header has cost so far.
struct Bounded<'a, R> {
    inner: &'a mut R,
    pos: u64,
    end: u64,
    spent: u64,
    limit: u64,
}

impl<R: Read> Bounded<'_, R> {
    fn left(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    /// Refuses `count` items of at least `size` bytes each where the file has fewer.
    fn fits(&self, count: u64, size: u64, what: &str) -> Result<(), HeaderError> {
        let needed = count.saturating_mul(size);
        if needed > self.left() {
            return Err(HeaderError::CutShort {
                what: format!("{what} of {count} entries"),
                needed,
                left: self.left(),
            });
        }
        Ok(())
    }

    /// Counts `cost` bytes of memory against the limit, before they are allocated.
    fn charge(&mut self, cost: u64, what: impl FnOnce() -> String) -> Result<(), HeaderError> {
        match self.spent.checked_add(cost) {
            Some(total) if total <= self.limit => {
                self.spent = total;
                Ok(())
            }
            _ => Err(HeaderError::OverBudget {
                what: what(),
                cost,
                limit: self.limit,
            }),
        }
    }

    fn bytes_fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], HeaderError> {
        self.fits(1, N as u64, what)?;
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, HeaderError> {
        Ok(u32::from_le_bytes(self.bytes_fixed(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, HeaderError> {
        Ok(u64::from_le_bytes(self.bytes_fixed(what)?))
    }

    /// A length or count: 32 bits in GGUF version 1, 64 bits since.
    fn length(&mut self, long: bool, what: &str) -> Result<u64, HeaderError> {
        match long {
            true => self.u64(what),
            false => self.u32(what).map(u64::from),
        }
    }

    /// A string as candle decodes it: trailing NULs dropped (some writers add
    /// them), invalid UTF-8 replaced.
    fn string(&mut self, long: bool, what: &str) -> Result<String, HeaderError> {
        let len = self.length(long, what)?;
        if len > self.left() {
            return Err(HeaderError::CutShort {
                what: format!("{what} (a string)"),
                needed: len,
                left: self.left(),
            });
        }
        self.charge(len, || format!("{what} (a string of {len} bytes)"))?;
        // Both checks passed: `len` is below the file's size and the budget.
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += len;
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// One value of type `code`; its own `Value` is charged by its container.
    fn value(
        &mut self,
        code: u32,
        long: bool,
        depth: usize,
        what: &str,
    ) -> Result<Value, HeaderError> {
        Ok(match code {
            0 => Value::U8(self.bytes_fixed::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.bytes_fixed(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes_fixed(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes_fixed(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.bytes_fixed(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes_fixed(what)?)),
            7 => match self.bytes_fixed::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                value => {
                    return Err(HeaderError::Bool {
                        what: what.to_string(),
                        value,
                    })
                }
            },
            8 => Value::String(self.string(long, what)?),
            9 => self.array(long, depth, what)?,
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes_fixed(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes_fixed(what)?)),
            code => {
                return Err(HeaderError::ValueType {
                    what: what.to_string(),
                    code,
                })
            }
        })
    }

    fn array(&mut self, long: bool, depth: usize, what: &str) -> Result<Value, HeaderError> {
        if depth >= MAX_DEPTH {
            return Err(HeaderError::Depth {
                what: what.to_string(),
            });
        }
        let code = self.u32(what)?;
        let len = self.length(long, what)?;
        let min_size = match code {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 if long => 8,
            8 => 4,
            9 if long => 12,
            9 => 8,
            code => {
                return Err(HeaderError::ValueType {
                    what: format!("{what} (an array)"),
                    code,
                })
            }
        };
        let whole = || format!("{what} (an array of {len} elements)");
        let needed = len.saturating_mul(min_size);
        if needed > self.left() {
            return Err(HeaderError::CutShort {
                what: whole(),
                needed,
                left: self.left(),
            });
        }
        self.charge(len.saturating_mul(VALUE_COST), whole)?;
        // Charged above: `len` values fit the budget and the file.
        let mut values = Vec::with_capacity(len as usize);
        for _ in 0..len {
            values.push(self.value(code, long, depth + 1, what)?);
        }
        Ok(Value::Array(values))
    }

    fn tensor_info(&mut self, name: &str, long: bool) -> Result<TensorInfo, HeaderError> {
        let what = format!("tensor {name}");
        let count = self.u32(&what)?;
        if count == 0 || count > MAX_DIMS {
            return Err(HeaderError::Dimensions {
                name: name.to_string(),
                count,
            });
        }
        // GGUF lists dimensions innermost first; candle's shapes are outermost first.
        let mut dims = Vec::with_capacity(MAX_DIMS as usize);
        for _ in 0..count {
            dims.push(self.length(long, &what)?);
        }
        dims.reverse();
        let code = self.u32(&what)?;
        let dtype = TensorType::from_code(code).ok_or_else(|| HeaderError::TensorType {
            name: name.to_string(),
            code,
        })?;
        let offset = self.u64(&what)?;

        let overflow = || HeaderError::Overflow {
            name: name.to_string(),
            dims: dims.clone(),
        };
        let elements = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(overflow)?;
        let block = dtype.block_size() as u64;
        if !elements.is_multiple_of(block) {
            return Err(HeaderError::PartialBlock {
                name: name.to_string(),
                elements,
                block,
            });
        }
        // candle computes the element count and the byte size in `usize`: both
        // must fit, and the byte size must fit with the offset added.
        let bytes = (elements / block)
            .checked_mul(dtype.type_size() as u64)
            .filter(|b| b.checked_add(offset).is_some())
            .ok_or_else(overflow)?;
        if usize::try_from(elements).is_err() || usize::try_from(bytes).is_err() {
            return Err(overflow());
        }
        Ok(TensorInfo {
            dtype,
            shape: dims.iter().map(|&d| d as usize).collect(),
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType};
    use std::io::Cursor;

    /// A version 3 header of `kvs` (key, type code, encoded value) and no tensors.
    fn header(kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (key, code, value) in kvs {
            out.extend((key.len() as u64).to_le_bytes());
            out.extend(key.as_bytes());
            out.extend(code.to_le_bytes());
            out.extend(value);
        }
        out
    }

    fn read_bytes(bytes: Vec<u8>, limit: u64) -> Result<Content, HeaderError> {
        read(&mut Cursor::new(bytes), limit)
    }

    #[test]
    fn reads_what_candle_writes_as_candle_reads_it() {
        let tensor =
            candle_core::Tensor::ones((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let q = candle_core::quantized::QTensor::quantize(&tensor, GgmlDType::Q4_0).unwrap();
        let words = Value::Array(vec![Value::String("a\0".into()), Value::String("b".into())]);
        let metadata = [
            ("general.architecture", &Value::String("llama".into())),
            ("tokenizer.ggml.tokens", &words),
            ("a.float", &Value::F64(0.5)),
            ("a.flag", &Value::Bool(true)),
        ];
        let mut file = Cursor::new(Vec::new());
        candle_core::quantized::gguf_file::write(&mut file, &metadata, &[("t", &q)]).unwrap();
        let ours = read_bytes(file.get_ref().clone(), HEADER_MEMORY_LIMIT).unwrap();
        let theirs = gguf_file::Content::read(&mut Cursor::new(file.into_inner())).unwrap();
        let sorted = |m: &HashMap<String, Value>| {
            let mut m: Vec<String> = m.iter().map(|e| format!("{e:?}")).collect();
            m.sort();
            m
        };
        assert_eq!(sorted(&ours.metadata), sorted(&theirs.metadata));
        assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset);
        assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len());
        for (name, theirs) in &theirs.tensor_infos {
            let ours = &ours.tensor_infos[name];
            assert_eq!(ours.dtype.candle(), Some(theirs.ggml_dtype));
            assert_eq!(ours.shape, theirs.shape.dims());
            assert_eq!(ours.offset, theirs.offset);
        }
    }

    #[test]
    fn alignment_must_be_a_power_of_two() {
        let with = |a: u32| {
            read_bytes(
                header(&[("general.alignment", 4, a.to_le_bytes().to_vec())]),
                1 << 20,
            )
        };
        let zero = with(0).unwrap_err().to_string();
        assert!(zero.contains("general.alignment is 0"), "{zero}");
        assert!(matches!(with(3), Err(HeaderError::Alignment(3))));
        assert_eq!(with(64).unwrap().tensor_data_offset % 64, 0);
    }

    #[test]
    fn an_array_is_charged_before_it_is_allocated() {
        let len = 1u64 << 20;
        let mut value = 0u32.to_le_bytes().to_vec();
        value.extend(len.to_le_bytes());
        value.resize(value.len() + len as usize, 0);
        let bytes = header(&[("big", 9, value)]);
        let err = read_bytes(bytes.clone(), 1 << 20).unwrap_err().to_string();
        assert!(
            err.contains("metadata big (an array of 1048576 elements) costs"),
            "{err}"
        );
        assert!(err.contains("limit of 1048576 bytes"), "{err}");
        assert!(read_bytes(bytes, 64 << 20).is_ok());
    }

    #[test]
    fn lengths_past_the_file_are_refused_before_reading() {
        let long = (1u64 << 40).to_le_bytes().to_vec();
        let err = read_bytes(header(&[("name", 8, long)]), u64::MAX).unwrap_err();
        assert!(matches!(err, HeaderError::CutShort { needed, .. } if needed == 1 << 40));
    }

    fn with_tensor(dims: &[u64], code: u32) -> Result<Content, HeaderError> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(1u64.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend(1u64.to_le_bytes());
        out.push(b't');
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(code.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        read_bytes(out, 1 << 20)
    }

    #[test]
    fn tensors_have_one_to_four_dimensions_whose_size_fits() {
        assert!(matches!(
            with_tensor(&[], 0),
            Err(HeaderError::Dimensions { count: 0, .. })
        ));
        assert!(matches!(
            with_tensor(&[1; 5], 0),
            Err(HeaderError::Dimensions { count: 5, .. })
        ));
        assert!(matches!(
            with_tensor(&[1 << 40, 1 << 40], 0),
            Err(HeaderError::Overflow { .. })
        ));
        assert!(matches!(
            with_tensor(&[1 << 62], 0),
            Err(HeaderError::Overflow { .. })
        ));
        assert!(matches!(
            with_tensor(&[33], 2),
            Err(HeaderError::PartialBlock { .. })
        ));
        assert!(matches!(
            with_tensor(&[32], 16),
            Err(HeaderError::TensorType { code: 16, .. })
        ));
        let ok = with_tensor(&[32, 3], 2).unwrap();
        assert_eq!(ok.tensor_infos["t"].shape, [3, 32]);
        // A type candle cannot hold is read all the same.
        let nl = with_tensor(&[64, 2], 20).unwrap();
        assert_eq!(nl.tensor_infos["t"].dtype, TensorType::IQ4_NL);
    }
}
