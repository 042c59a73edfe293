//! Model compute: reading a GGUF model of a supported architecture ([`arch`]) and
//! running a contiguous range of its transformer layers (a *shard*) over hidden
//! states.
//!
//! Each architecture is one file in [`arch`]: the keys of its [`config`], its
//! tensors (whatever else a file holds is refused, [`understood`]) and its layer,
//! built from the shared [`pieces`] (norms, Q/K/V, [`rope`], attention, feed-forward).
//! A [`shard`] runs a range of those layers. KV caches live in [`kv_cache`], outside
//! the weights, one per session, so many sessions share one loaded shard.

pub mod arch;
mod attention;
pub mod config;
pub mod gguf;
pub mod gguf_header;
pub mod hidden;
pub mod kernels;
pub mod kv_cache;
pub mod model_id;
pub mod pieces;
pub mod rope;
pub mod shard;
pub mod tensor_type;
pub mod understood;

use std::path::PathBuf;

pub use config::ModelConfig;
pub use gguf::GgufFile;
pub use hidden::Hidden;
pub use kv_cache::ShardCache;
pub use model_id::{manifest, model_id};
pub use shard::Shard;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a GGUF file (it does not start with the GGUF magic bytes)")]
    NotGguf(PathBuf),
    #[error("model file {path} is truncated: {detail}; download it again")]
    Truncated { path: PathBuf, detail: String },
    #[error("model file {path} has a malformed GGUF header: {problem}")]
    BadHeader {
        path: PathBuf,
        problem: gguf_header::HeaderError,
    },
    #[error(
        "unsupported model architecture {name:?}: supported are {}",
        arch::names()
    )]
    UnsupportedArchitecture { name: String },
    #[error("unsupported tensor type {dtype}{}", tensor.as_ref().map(|t| format!(" for tensor {t}")).unwrap_or_default())]
    UnsupportedTensorType {
        tensor: Option<String>,
        dtype: String,
    },
    #[error("model metadata lacks {0}")]
    MissingMetadata(String),
    #[error("model metadata {0} is not {1}")]
    BadMetadata(String, &'static str),
    #[error("model file lacks tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("unsupported model configuration: {0}")]
    BadConfig(String),
    #[error("unsupported model file: {0}; this version cannot compute this model exactly, so it refuses to run it")]
    NotUnderstood(String),
    #[error(transparent)]
    LayerRange(#[from] allmende_protocol::LayerRangeError),
    #[error("unsupported tokenizer: {0}")]
    Tokenizer(String),
    #[error("compute error: {0}")]
    Candle(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Candle(candle_message(&e))
    }
}

/// candle's message without the backtrace it appends when `RUST_BACKTRACE` is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().trim().to_string()
}

/// Calls `f` with the f32 values of `t` in row-major order, read in place from the
/// tensor's memory (copied only if `t` is not contiguous).
pub fn with_values<R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("the tensor is not in CPU memory");
    };
    let all = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(f(&all[start..end])),
        None => candle_core::bail!("the tensor is not contiguous"),
    }
}

/// `f` of each item, the items spread over candle's compute threads; results in order.
pub fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
        for i in range {
            let result = f(&items[i]);
            // Each slot is written once, by one thread: never contended.
            match slots[i].lock() {
                Ok(mut slot) => *slot = Some(result),
                Err(poisoned) => *poisoned.into_inner() = Some(result),
            }
        }
    });
    slots
        .into_iter()
        .map(|slot| match slot.into_inner() {
            Ok(result) => result,
            Err(poisoned) => poisoned.into_inner(),
        })
        .map(|result| result.expect("the pool runs every item"))
        .collect()
}

/// `f` over `values` cut into rows of `width_in` values, each giving a row of
/// `width_out` values, all in one vector: on the calling thread for up to `per_task`
/// rows, else in tasks of `per_task` rows over candle's compute threads (fewer rows
/// take less time than handing work to another thread and back). `f` gets whole rows
/// and room for their outputs.
pub fn map_rows(
    values: &[f32],
    (width_in, width_out): (usize, usize),
    per_task: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let rows = values.len() / width_in.max(1);
    let values = &values[..rows * width_in];
    let run = |x: &[f32]| {
        let mut y = vec![0f32; x.len() / width_in.max(1) * width_out];
        f(x, &mut y);
        y
    };
    if rows <= per_task.max(1) {
        return run(values);
    }
    let tasks: Vec<&[f32]> = values.chunks(per_task * width_in).collect();
    parallel_map(&tasks, |x| run(x)).concat()
}

/// Errors of one forward pass: bad input from a caller, or a compute failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    #[error("hidden states have shape {actual:?}; expected [batch, seq, {hidden_size}]")]
    Shape {
        actual: Vec<usize>,
        hidden_size: usize,
    },
    #[error("sequence is full: {used} positions used, {requested} more requested, maximum {max}")]
    ContextFull {
        used: usize,
        requested: usize,
        max: usize,
    },
    #[error("batch size {actual} differs from the session's batch size {expected}")]
    Batch { actual: usize, expected: usize },
    #[error("the session's layers {cache} are not all in this shard's {shard}")]
    Range {
        cache: allmende_protocol::LayerRange,
        shard: allmende_protocol::LayerRange,
    },
    #[error("compute error: {0}")]
    Candle(#[from] candle_core::Error),
}
