//! Llama 2 and 3.x, Mistral, TinyLlama, SmolLM: the base layout. Llama 3.1's RoPE
//! frequency factors and linear RoPE scaling are read for every architecture.

use super::{Architecture, RopeStyle};

pub const ARCH: Architecture = Architecture {
    name: "llama",
    rope: RopeStyle::Adjacent,
    qk_norm: false,
    fused_gate_up: false,
    sliding_window_key: None,
};
