//! Phi-3 (mini and medium, 4k context): Q, K and V fused into one `attn_qkv`, gate
//! and up fused into one `ffn_up`, RoPE over halves, and a sliding window. The 128k
//! variants' long/short RoPE factors are refused by the loader.

use super::{Architecture, RopeStyle};

pub const ARCH: Architecture = Architecture {
    name: "phi3",
    rope: RopeStyle::Halves,
    qk_norm: false,
    fused_gate_up: true,
    sliding_window_key: Some("attention.sliding_window"),
};
