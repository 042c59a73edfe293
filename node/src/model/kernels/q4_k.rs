//! Q4_K: per 256 values an f16 super-scale and super-minimum, per 32 values 6-bit
//! multiples of them, and 4-bit quants (`w = D·sc·q − Dmin·mn`), computed by the
//! [`grouped`](super::grouped) kernel.

use crate::model::tensor_type::TensorType;

use super::grouped::{Format, Group, SuperScales};

pub type GroupQ4K = Group<Q4K, 8, 0>;

#[derive(Clone, Copy)]
pub struct Q4K;

/// Sub-block `j`'s 6-bit scale and minimum from a K-quant's 12 packed bytes (ggml's
/// `get_scale_min_k4`).
pub fn scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// A K-quant's super-scales and its eight sub-blocks' scales into row `lane`.
pub fn super_scales(block: &[u8], scales: &mut SuperScales, lane: usize) {
    scales.d[lane] = u16::from_le_bytes([block[0], block[1]]);
    scales.dmin[lane] = u16::from_le_bytes([block[2], block[3]]);
    for j in 0..8 {
        (scales.sc[j][lane], scales.mn[j][lane]) = scale_min(j, &block[4..16]);
    }
}

/// The 256 low nibbles of a K-quant: 32 bytes per 64 values, the first 32 values in
/// the low nibbles.
pub fn nibbles(qs: &[u8], quants: &mut [u8]) {
    for (c, bytes) in qs.chunks_exact(32).enumerate() {
        for (l, &byte) in bytes.iter().enumerate() {
            quants[64 * c + l] = byte & 0x0F;
            quants[64 * c + 32 + l] = byte >> 4;
        }
    }
}

impl Format for Q4K {
    const DTYPE: TensorType = TensorType::Q4K;
    const BYTES: usize = 144;
    const SUB: usize = 8;
    const PLANES: usize = 0;
    const OFFSET: i32 = 0;
    type Scales = SuperScales;

    /// ggml's block_q4_K: f16 d and dmin, 12 bytes of packed scales, 128 of quants.
    fn decode(block: &[u8], quants: &mut [u8], scales: &mut SuperScales, lane: usize) {
        super_scales(block, scales, lane);
        nibbles(&block[16..144], quants);
    }
}
