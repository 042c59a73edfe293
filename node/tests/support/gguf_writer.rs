//! A GGUF writer that writes what it is told, lies included: hostile-file tests need
//! headers no real writer would produce (a zero alignment, an array longer than the
//! file, a tensor without dimensions).

/// Value type codes of the GGUF format.
pub const U32: u32 = 4;
pub const F32: u32 = 6;
pub const STRING: u32 = 8;
pub const ARRAY: u32 = 9;
pub const U64: u32 = 10;
pub const U8: u32 = 0;

/// ggml's type code for f32 tensors.
pub const GGML_F32: u32 = 0;

#[derive(Clone, Default)]
pub struct Gguf {
    metadata: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, usize)>,
}

impl Gguf {
    /// A metadata entry whose value is `bytes`, as encoded after its type code.
    pub fn raw(mut self, key: &str, value_type: u32, bytes: Vec<u8>) -> Self {
        self.metadata.retain(|(k, _, _)| k != key);
        self.metadata.push((key.to_string(), value_type, bytes));
        self
    }

    pub fn u32(self, key: &str, value: u32) -> Self {
        self.raw(key, U32, value.to_le_bytes().to_vec())
    }

    pub fn u64(self, key: &str, value: u64) -> Self {
        self.raw(key, U64, value.to_le_bytes().to_vec())
    }

    pub fn f32(self, key: &str, value: f32) -> Self {
        self.raw(key, F32, value.to_le_bytes().to_vec())
    }

    pub fn string(self, key: &str, value: &str) -> Self {
        self.raw(key, STRING, string(value))
    }

    /// A tensor with `dims` as the file lists them (innermost first) and `data_len`
    /// bytes of zeros as its data.
    pub fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, data_len: usize) -> Self {
        self.tensors.retain(|(n, ..)| n != name);
        self.tensors
            .push((name.to_string(), dims.to_vec(), ggml_type, data_len));
        self
    }

    /// The file: version 3, tensor data aligned to 32 bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value_type, bytes) in &self.metadata {
            out.extend(string(key));
            out.extend(value_type.to_le_bytes());
            out.extend(bytes);
        }
        let mut offset = 0u64;
        for (name, dims, ggml_type, data_len) in &self.tensors {
            out.extend(string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ggml_type.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (*data_len as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (.., data_len) in &self.tensors {
            out.resize(out.len() + data_len.div_ceil(32) * 32, 0);
        }
        out
    }
}

/// A GGUF string: its length, then its bytes.
pub fn string(value: &str) -> Vec<u8> {
    let mut out = (value.len() as u64).to_le_bytes().to_vec();
    out.extend(value.as_bytes());
    out
}

/// The header of an array of `len` elements of `value_type`, without the elements.
pub fn array_header(value_type: u32, len: u64) -> Vec<u8> {
    let mut out = value_type.to_le_bytes().to_vec();
    out.extend(len.to_le_bytes());
    out
}

/// A small well-formed Llama header: the hyper-parameters and the embeddings
/// (8 tokens of width 64), without blocks or vocabulary. Each hostile file is this
/// with one thing changed.
pub fn tiny_llama() -> Gguf {
    Gguf::default()
        .string("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 128)
        .u32("llama.embedding_length", 64)
        .u32("llama.feed_forward_length", 128)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 2)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .tensor("token_embd.weight", &[64, 8], GGML_F32, 64 * 8 * 4)
}
