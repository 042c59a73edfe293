//! Qwen 3 (dense): per-head RMS norms of queries and keys before RoPE, RoPE over
//! halves, and a head size of its own (`attention.key_length`), not width / heads.

use super::{Architecture, RopeStyle};

pub const ARCH: Architecture = Architecture {
    name: "qwen3",
    rope: RopeStyle::Halves,
    qk_norm: true,
    fused_gate_up: false,
    sliding_window_key: None,
};
