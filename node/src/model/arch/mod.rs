//! What sets each supported architecture apart, one small file each. Everything
//! else (the block's order of operations, tensor names, the loader's checks) is
//! shared: these families all follow llama.cpp's `llama` layout with a few switches.
//! Adding an architecture is adding a file here and a line to [`ALL`].

mod llama;
mod phi3;
mod qwen2;
mod qwen3;

/// How RoPE pairs a head's values for rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)`: llama.cpp's "normal" rope, for which its
    /// converter permutes Llama's Q and K rows.
    Adjacent,
    /// Pairs `(i, i + d/2)`: llama.cpp's "neox" rope, the checkpoints' own layout.
    Halves,
}

/// One architecture's switches over the shared layout.
#[derive(Debug, PartialEq, Eq)]
pub struct Architecture {
    /// `general.architecture`, also the prefix of its metadata keys.
    pub name: &'static str,
    pub rope: RopeStyle,
    /// Per-head RMS norms of queries and keys before RoPE
    /// (`attn_q_norm`/`attn_k_norm`), required.
    pub qk_norm: bool,
    /// Gate and up in one `ffn_up` of twice the width, gate first, and no `ffn_gate`.
    pub fused_gate_up: bool,
    /// The metadata key of a sliding attention window, where the architecture has
    /// one: sessions are capped to the window, where full and windowed attention
    /// agree (llama.cpp computes full attention for these files).
    pub sliding_window_key: Option<&'static str>,
}

/// Every supported architecture.
pub const ALL: &[&Architecture] = &[&llama::ARCH, &qwen2::ARCH, &qwen3::ARCH, &phi3::ARCH];

/// The architecture named `name` (a file's `general.architecture`), if supported.
pub fn find(name: &str) -> Option<&'static Architecture> {
    ALL.iter().copied().find(|a| a.name == name)
}

/// The supported names, for error messages.
pub fn names() -> String {
    ALL.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}
