//! Q4_0: per 32 values an f16 scale and 4-bit quants around 8 (`w = d·(q − 8)`),
//! computed by the [`grouped`](super::grouped) kernel.

use crate::model::tensor_type::TensorType;

use super::grouped::{Format, Group, WithOffset};

pub type GroupQ4_0 = Group<Q4_0, 1, 0>;

#[derive(Clone, Copy)]
pub struct Q4_0;

impl Format for Q4_0 {
    const DTYPE: TensorType = TensorType::Q4_0;
    const BYTES: usize = 18;
    const SUB: usize = 1;
    const PLANES: usize = 0;
    const OFFSET: i32 = 8;
    type Scales = WithOffset;

    /// ggml's block_q4_0: f16 d, 16 bytes (values 0..16 in the low nibbles, 16..32 in
    /// the high ones).
    fn decode(block: &[u8], quants: &mut [u8], scales: &mut WithOffset, lane: usize) {
        scales.d[lane] = u16::from_le_bytes([block[0], block[1]]);
        for (j, &byte) in block[2..18].iter().enumerate() {
            quants[j] = byte & 0x0F;
            quants[j + 16] = byte >> 4;
        }
    }
}
