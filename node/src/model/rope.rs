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

    /// Rotates `x`, heads of `seq` positions (the first is `pos`) of `head_dim`
    /// values each, one after another, in place: the pair `(x0, x1)` becomes
    /// `(x0 cos - x1 sin, x0 sin + x1 cos)`, as candle's `rope_i` computes it.
    pub fn rotate(&self, x: &mut [f32], seq: usize, head_dim: usize, pos: usize) -> Result<()> {
        let half = head_dim / 2;
        let (_, table_half) = self.cos.dims2()?;
        if half != table_half || seq == 0 || !x.len().is_multiple_of(seq * head_dim) {
            candle_core::bail!(
                "cannot rotate {} values as heads of {seq} × {head_dim}",
                x.len()
            );
        }
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        super::with_values(&cos, |cos| {
            super::with_values(&sin, |sin| {
                for head in x.chunks_exact_mut(seq * head_dim) {
                    for (t, row) in head.chunks_exact_mut(head_dim).enumerate() {
                        let (cos, sin) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                        for ((pair, &c), &s) in row.chunks_exact_mut(2).zip(cos).zip(sin) {
                            let (x0, x1) = (pair[0], pair[1]);
                            pair[0] = x0 * c - x1 * s;
                            pair[1] = x0 * s + x1 * c;
                        }
                    }
                }
            })
        })?
    }
}
