//! Rotary position embeddings in llama.cpp's "normal" convention for Llama GGUFs:
//! rotation of adjacent pairs (2i, 2i+1). (The GGUF converter permutes Q and K so
//! that this matches the half-split rotation of the original checkpoint.)

use candle_core::{bail, Result};

pub struct Rope {
    /// `cos(theta)` and `sin(theta)` per position, `head_dim / 2` values each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    /// Tables for positions `0..max_positions`. Angles are built as ggml builds them,
    /// `theta_i = pos * base^(-2i/d)` accumulated by repeated f32 multiplication, so the
    /// rotation matches llama.cpp to the last bit wherever the libm agrees.
    pub fn new(head_dim: usize, freq_base: f32, max_positions: usize) -> Result<Self> {
        let half = head_dim / 2;
        if half == 0 {
            bail!("head size {head_dim} is too small for rotary embeddings");
        }
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
        Ok(Self { cos, sin, half })
    }

    /// One head's row `x` (`head_dim` values) rotated for position `pos`, written to
    /// `out`: the pair `(x0, x1)` becomes `(x0 cos - x1 sin, x0 sin + x1 cos)`, as
    /// candle's `rope_i` computes it.
    pub fn rotate_into(&self, x: &[f32], out: &mut [f32], pos: usize) -> Result<()> {
        let half = self.half;
        if x.len() != 2 * half || out.len() != 2 * half || (pos + 1) * half > self.cos.len() {
            bail!(
                "cannot rotate {} values at position {pos} (head size {}, {} positions)",
                x.len(),
                2 * half,
                self.cos.len() / half
            );
        }
        let (cos, sin) = (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        );
        let pairs = x.chunks_exact(2).zip(out.chunks_exact_mut(2));
        for ((pair, y), (&c, &s)) in pairs.zip(cos.iter().zip(sin)) {
            let (x0, x1) = (pair[0], pair[1]);
            y[0] = x0 * c - x1 * s;
            y[1] = x0 * s + x1 * c;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_as_candle_does() {
        use candle_core::{Device, Tensor};
        let (hd, positions) = (8, 5);
        let rope = Rope::new(hd, 10_000.0, positions).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 2, positions, hd), &Device::Cpu).unwrap();
        let cos = Tensor::from_vec(rope.cos.clone(), (positions, hd / 2), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(rope.sin.clone(), (positions, hd / 2), &Device::Cpu).unwrap();
        let theirs = candle_nn::rotary_emb::rope_i(&x, &cos, &sin).unwrap();
        let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, row) in values.chunks_exact(hd).enumerate() {
            let mut ours = vec![0f32; hd];
            rope.rotate_into(row, &mut ours, i % positions).unwrap();
            assert_eq!(ours, theirs[i * hd..][..hd], "row {i}");
        }
        let mut out = vec![0f32; hd];
        assert!(rope
            .rotate_into(&values[..hd], &mut out, positions)
            .is_err());
        assert!(rope
            .rotate_into(&values[..hd - 2], &mut out[..hd - 2], 0)
            .is_err());
    }
}
