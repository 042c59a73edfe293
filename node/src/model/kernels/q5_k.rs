//! Q5_K: Q4_K with a fifth bit per quant, computed by the [`grouped`](super::grouped)
//! kernel.

use crate::model::tensor_type::TensorType;

use super::grouped::{Format, Group, SuperScales};
use super::q4_k::{nibbles, super_scales};

pub type GroupQ5K = Group<Q5K, 8, 1>;

#[derive(Clone, Copy)]
pub struct Q5K;

impl Format for Q5K {
    const DTYPE: TensorType = TensorType::Q5K;
    const BYTES: usize = 176;
    const SUB: usize = 8;
    const PLANES: usize = 1;
    const OFFSET: i32 = 0;
    type Scales = SuperScales;

    /// ggml's block_q5_K: f16 d and dmin, 12 bytes of packed scales, 32 bytes of fifth
    /// bits (bit `j` of byte `l` for value `32j + l`), 128 of low nibbles.
    fn decode(block: &[u8], quants: &mut [u8], scales: &mut SuperScales, lane: usize) {
        super_scales(block, scales, lane);
        nibbles(&block[48..176], quants);
        for (l, &bits) in block[16..48].iter().enumerate() {
            for j in 0..8 {
                quants[32 * j + l] |= ((bits >> j) & 1) << 4;
            }
        }
    }
}
