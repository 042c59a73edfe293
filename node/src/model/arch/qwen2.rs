//! Qwen 2 and 2.5: biases on Q, K and V (any architecture may carry those, as in
//! llama.cpp; Qwen 2 always does), and RoPE over halves.

use super::{Architecture, RopeStyle};

pub const ARCH: Architecture = Architecture {
    name: "qwen2",
    rope: RopeStyle::Halves,
    qk_norm: false,
    fused_gate_up: false,
    sliding_window_key: None,
};
