//! The shared pieces an architecture builds its layer from (llama.cpp's `build_norm`,
//! `build_qkv`, `build_attn`, `build_ffn`): loading checked tensors, RMS norms (the
//! residual stream is [`Hidden::add`](crate::model::Hidden::add)), the Q/K/V projection, attention over a session's cache with RoPE,
//! and a gated feed-forward. Each piece keeps its kernels and order of operations, so
//! two architectures built from the same pieces compute the same bits.

pub mod ffn;
pub mod load;
pub mod norm;
pub mod qkv;
pub mod self_attention;

use super::kv_cache::ShardCache;

/// One sequence's share of a batched forward: tokens `start..start + len` of the input
/// and the sequence's cache.
pub struct Part<'a> {
    pub start: usize,
    pub len: usize,
    pub cache: &'a mut ShardCache,
}
