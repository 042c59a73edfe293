//! GeGLU, `gelu(gate) × up` with GELU's tanh form, for one token's row, as llama.cpp's
//! CPU backend computes it (`ggml_vec_geglu_f32`): below -10 the product is 0, from
//! 10 up the gate passes unchanged, and between them the gate is rounded to f16 and
//! looked up in a table of GELU over every f16 value, itself rounded to f16. The
//! table makes the activation a function of 16 bits, so matching it bit for bit
//! needs the same rounding, not a closer GELU.

use std::sync::OnceLock;

use half::f16;

const GELU_COEF_A: f32 = 0.044715;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// GELU (tanh form) in f32, as ggml writes it; `tanhf` from `libm` so that every
/// platform builds the same table.
fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::tanhf(SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)))
}

/// GELU of every f16 value, rounded to f16: built once, 128 KiB.
fn table() -> &'static [f16] {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_f32(f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// `out[i] = gelu(gate[i]) × up[i]` for the common length of the three.
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert!(gate.len() == up.len() && up.len() == out.len());
    let table = table();
    for ((y, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *y = if g <= -10.0 {
            0.0
        } else if g >= 10.0 {
            g * u
        } else {
            table[usize::from(f16::from_f32(g).to_bits())].to_f32() * u
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_f16_table_and_its_edges() {
        let gate = [-11.0, -10.0, 0.0, 1.0, 0.3333, 9.99, 10.0, 20.0];
        let up = [2.0; 8];
        let mut out = [0f32; 8];
        geglu(&gate, &up, &mut out);
        assert_eq!(out[..3], [0.0, 0.0, 0.0]);
        // gelu(1) = 0.841192, rounded to f16.
        assert_eq!(out[3], f16::from_f32(0.841_192).to_f32() * 2.0);
        let third = f16::from_f32(0.3333).to_f32();
        assert_eq!(out[4], f16::from_f32(gelu_f32(third)).to_f32() * 2.0);
        assert_eq!(out[6..], [20.0, 40.0]);
        // Values between two f16 neighbours share one result.
        let mut a = [0f32; 1];
        let mut b = [0f32; 1];
        geglu(&[1.0001], &[1.0], &mut a);
        geglu(&[1.0002], &[1.0], &mut b);
        assert_eq!(a, b);
    }
}
