//! Rotary position embeddings in llama.cpp's "normal" convention for Llama GGUFs:
//! rotation of adjacent pairs (2i, 2i+1). (The GGUF converter permutes Q and K so
//! that this matches the half-split rotation of the original checkpoint.)

use candle_core::{Device, Result, Tensor};

pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for positions `0..max_positions`. Angles are built as ggml builds them,
    /// `theta_i = pos * base^(-2i/d)` accumulated by repeated f32 multiplication, so the
    /// rotation matches llama.cpp to the last bit wherever the libm agrees.
    pub fn new(head_dim: usize, freq_base: f32, max_positions: usize) -> Result<Self> {
        let half = head_dim / 2;
        let theta_scale = freq_base.powf(-2.0 / head_dim as f32);
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            let mut theta = pos as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_positions, half), &Device::Cpu)?,
        })
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` whose first position is `pos`.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (_, _, seq, _) = x.dims4()?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
    }
}
