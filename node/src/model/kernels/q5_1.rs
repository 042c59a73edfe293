//! Q5_1: per 32 values an f16 scale and minimum and 5-bit quants (`w = d·q + m`),
//! computed by the [`grouped`](super::grouped) kernel.

use crate::model::tensor_type::TensorType;

use super::grouped::{Format, Group, WithMin};
use super::q5_0::five_bits;

pub type GroupQ5_1 = Group<Q5_1, 1, 1>;

#[derive(Clone, Copy)]
pub struct Q5_1;

impl Format for Q5_1 {
    const DTYPE: TensorType = TensorType::Q5_1;
    const BYTES: usize = 24;
    const SUB: usize = 1;
    const PLANES: usize = 1;
    const OFFSET: i32 = 0;
    type Scales = WithMin;

    /// ggml's block_q5_1: f16 d and m, the fifth bits, 16 bytes of nibbles.
    fn decode(block: &[u8], quants: &mut [u8], scales: &mut WithMin, lane: usize) {
        scales.d[lane] = u16::from_le_bytes([block[0], block[1]]);
        scales.m[lane] = u16::from_le_bytes([block[2], block[3]]);
        let high = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
        five_bits(high, &block[8..24], quants);
    }
}
