//! IQ4_NL weights (per 32 values: an f16 scale and 4-bit indices into a fixed
//! non-linear table of signed values) times activations quantized to Q8_0, per block
//! `d_w × d_x × Σ kvalues[q]·x`, as ggml's `vec_dot_iq4_nl_q8_0`.
//!
//! The table's values are 8-bit integers, so a block is Q8_0's (an f16 scale times 32
//! signed bytes) once they are looked up: the lookup is done once, at load, and the
//! matrix is kept and computed exactly as [`super::q8_0`] keeps and computes Q8_0, on
//! every path and in the order of float operations that module describes. Memory
//! per weight is that of Q8_0, not the file's 4.5 bits.

use super::q8_0::{GroupInt8, Int8Source};
use super::BLOCK;
use crate::model::tensor_type::TensorType;

/// ggml's `kvalues_iq4nl`: the value each 4-bit index stands for.
pub const KVALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

pub type GroupIq4Nl = GroupInt8<Iq4Nl>;

#[derive(Clone, Copy, Debug)]
pub struct Iq4Nl;

impl Int8Source for Iq4Nl {
    const DTYPE: TensorType = TensorType::IQ4_NL;
    const BYTES: usize = 18;

    /// ggml's block_iq4_nl: f16 d, 16 bytes of indices (values 0..16 in the low
    /// nibbles, 16..32 in the high ones).
    fn decode(block: &[u8], values: &mut [i8; BLOCK]) -> u16 {
        for (j, &byte) in block[2..18].iter().enumerate() {
            values[j] = KVALUES[(byte & 0x0F) as usize];
            values[j + 16] = KVALUES[(byte >> 4) as usize];
        }
        u16::from_le_bytes([block[0], block[1]])
    }
}
