//! Q5_0: per 32 values an f16 scale and 5-bit quants around 16 (`w = d·(q − 16)`),
//! computed by the [`grouped`](super::grouped) kernel. Small models' "Q4_K_M" files
//! are mostly Q5_0: llama-quantize falls back to it for rows that are not whole
//! K-quant blocks.

use crate::model::tensor_type::TensorType;

use super::grouped::{Format, Group, WithOffset};

pub type GroupQ5_0 = Group<Q5_0, 1, 1>;

#[derive(Clone, Copy)]
pub struct Q5_0;

/// The 32 quants of a block whose fifth bits are `high` (bit `j` for value `j`) and
/// whose low nibbles are `qs` (values 0..16 low, 16..32 high): Q5_0's and Q5_1's.
pub fn five_bits(high: u32, qs: &[u8], quants: &mut [u8]) {
    for (j, &byte) in qs[..16].iter().enumerate() {
        quants[j] = (byte & 0x0F) | (((high >> j) & 1) << 4) as u8;
        quants[j + 16] = (byte >> 4) | (((high >> (j + 16)) & 1) << 4) as u8;
    }
}

impl Format for Q5_0 {
    const DTYPE: TensorType = TensorType::Q5_0;
    const BYTES: usize = 22;
    const SUB: usize = 1;
    const PLANES: usize = 1;
    const OFFSET: i32 = 16;
    type Scales = WithOffset;

    /// ggml's block_q5_0: f16 d, the fifth bits as a little-endian u32, 16 bytes of
    /// nibbles.
    fn decode(block: &[u8], quants: &mut [u8], scales: &mut WithOffset, lane: usize) {
        scales.d[lane] = u16::from_le_bytes([block[0], block[1]]);
        let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        five_bits(high, &block[6..22], quants);
    }
}
