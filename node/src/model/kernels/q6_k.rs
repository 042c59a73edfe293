//! Q6_K: per 256 values an f16 scale, per 16 values a signed 8-bit multiple of it, and
//! 6-bit quants around 32 (`w = d·sc·(q − 32)`), computed by the
//! [`grouped`](super::grouped) kernel.

use crate::model::tensor_type::TensorType;

use super::grouped::{Format, Group, SixScales};

pub type GroupQ6K = Group<Q6K, 8, 2>;

#[derive(Clone, Copy)]
pub struct Q6K;

impl Format for Q6K {
    const DTYPE: TensorType = TensorType::Q6K;
    const BYTES: usize = 210;
    const SUB: usize = 8;
    const PLANES: usize = 2;
    const OFFSET: i32 = 32;
    type Scales = SixScales;

    /// ggml's block_q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed
    /// scales, f16 d. Per 128 values `n`, byte `l` of each part holds four values
    /// 32 apart.
    fn decode(block: &[u8], quants: &mut [u8], scales: &mut SixScales, lane: usize) {
        let (ql, qh) = (&block[..128], &block[128..192]);
        for n in 0..2 {
            let (ql, qh, q) = (&ql[64 * n..], &qh[32 * n..], &mut quants[128 * n..]);
            for l in 0..32 {
                let high = |shift: u8| ((qh[l] >> shift) & 3) << 4;
                q[l] = (ql[l] & 0x0F) | high(0);
                q[l + 32] = (ql[l + 32] & 0x0F) | high(2);
                q[l + 64] = (ql[l] >> 4) | high(4);
                q[l + 96] = (ql[l + 32] >> 4) | high(6);
            }
        }
        for (k, &sc) in block[192..208].iter().enumerate() {
            scales.sc[k][lane] = sc as i8;
        }
        scales.d[lane] = u16::from_le_bytes([block[208], block[209]]);
    }
}
