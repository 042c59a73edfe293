//! Matrix kernels for the weights of real GGUF files: Q4_1 and Q8_0 in their own
//! modules (IQ4_NL through Q8_0's, its values looked up at load), the formats with small unsigned quants and per-32-value scales (Q4_0,
//! Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) through one [`grouped`] kernel, and F16 and BF16
//! kept in 16 bits ([`float16`]).
//!
//! The quantized kernels follow ggml's arithmetic (activations quantized to 8 bits per block, integer
//! block dot products, f32 accumulation with fused multiply-adds by the block
//! scales), each in one fixed order its module describes. Every output is the same
//! sequence of float operations whatever the tile, thread count, batch or SIMD width
//! it is computed with: results are bit-identical on every path (portable, AVX2,
//! AVX-512, NEON), and a token's result does not depend on which other tokens share
//! its batch, which batched decode relies on. The path is chosen at run time.

mod activations;
pub mod attend;
mod driver;
pub mod float16;
mod geglu;
mod grouped;
#[cfg(target_arch = "aarch64")]
mod half_neon;
pub mod iq4_nl;
mod matrix;
mod norm;
mod pages;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod softmax;
mod swiglu;

pub use geglu::geglu;
pub use matrix::{Matrix, WeightBlock};
pub use norm::rms_norm;
pub use swiglu::swiglu;

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Result, Tensor};

use crate::model::hidden::Hidden;
use crate::model::tensor_type::{StoredTensor, TensorType};

/// Values per quantized block.
const BLOCK: usize = 32;

/// A weight matrix computed by this module's kernels, whatever its block type.
pub trait Product: Send + Sync {
    /// `x`: `[..., in]` → `[..., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// `x`: `[batch, seq, in]` → `[batch, seq, out]`.
    fn apply(&self, x: &Hidden) -> Result<Hidden>;
    /// Rows `ids`, dequantized: `[ids.len(), in]`.
    fn rows_of(&self, ids: &[u32]) -> Result<Tensor>;
}

impl<B: WeightBlock> Product for Matrix<B> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Matrix::forward(self, x)
    }

    fn apply(&self, x: &Hidden) -> Result<Hidden> {
        Matrix::apply(self, x)
    }

    fn rows_of(&self, ids: &[u32]) -> Result<Tensor> {
        Matrix::rows_of(self, ids)
    }
}

/// A weight matrix.
pub enum Linear {
    /// A type this module has no kernel for, computed by candle.
    Candle(QMatMul),
    /// A type this module computes.
    Ours(Box<dyn Product>),
}

impl Linear {
    /// The matrix computed by this module's kernels where they cover its type, else
    /// by candle's (an error naming the type where neither does).
    pub fn new(weights: Arc<StoredTensor>) -> Result<Self> {
        match Self::ours(&[&weights])? {
            Some(linear) => Ok(linear),
            None => Ok(Linear::Candle(QMatMul::from_arc(Arc::new(
                weights.to_candle()?,
            ))?)),
        }
    }

    /// The rows of `parts` as one matrix for this module's kernels, if they all have
    /// one type the kernels cover.
    fn ours(parts: &[&StoredTensor]) -> Result<Option<Self>> {
        let Some(dtype) = parts.first().map(|p| p.dtype) else {
            return Ok(None);
        };
        if parts.iter().any(|p| p.dtype != dtype) {
            return Ok(None);
        }
        struct Stack<'a>(&'a [&'a StoredTensor]);
        impl ForBlock for Stack<'_> {
            type Output = Result<Linear>;
            fn run<B: WeightBlock>(self) -> Result<Linear> {
                Ok(Linear::Ours(Box::new(Matrix::<B>::stack(self.0)?)))
            }
        }
        for_block(dtype, Stack(parts)).transpose()
    }

    /// Rows `ids` of the matrix, dequantized: `[ids.len(), in]` (an embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => m.embedding(&Tensor::from_slice(ids, ids.len(), &Device::Cpu)?),
            Linear::Ours(m) => m.rows_of(ids),
        }
    }

    /// `x`: `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Ours(m) => m.forward(x),
        }
    }

    /// `x`: `[batch, seq, in]` → `[batch, seq, out]`; through a tensor only where
    /// candle computes the type.
    pub fn apply(&self, x: &Hidden) -> Result<Hidden> {
        match self {
            Linear::Candle(m) => Hidden::from_tensor(&m.forward(&x.clone().into_tensor()?)?),
            Linear::Ours(m) => m.apply(x),
        }
    }
}

/// Something done with the block type that computes a quant type.
pub trait ForBlock {
    type Output;
    fn run<B: WeightBlock>(self) -> Self::Output;
}

/// `f` run with the block type this module computes `dtype` with, if it has one:
/// the one place a quant type with kernels of its own is registered.
pub fn for_block<F: ForBlock>(dtype: TensorType, f: F) -> Option<F::Output> {
    Some(match dtype {
        TensorType::Q4_0 => f.run::<q4_0::GroupQ4_0>(),
        TensorType::Q4_1 => f.run::<q4_1::GroupQ4_1>(),
        TensorType::Q5_0 => f.run::<q5_0::GroupQ5_0>(),
        TensorType::Q5_1 => f.run::<q5_1::GroupQ5_1>(),
        TensorType::Q8_0 => f.run::<q8_0::GroupQ8_0>(),
        TensorType::Q4K => f.run::<q4_k::GroupQ4K>(),
        TensorType::Q5K => f.run::<q5_k::GroupQ5K>(),
        TensorType::Q6K => f.run::<q6_k::GroupQ6K>(),
        TensorType::IQ4_NL => f.run::<iq4_nl::GroupIq4Nl>(),
        TensorType::F16 => f.run::<float16::BlockF16>(),
        TensorType::BF16 => f.run::<float16::BlockBf16>(),
        _ => return None,
    })
}

/// Whether this module computes `dtype` with kernels of its own.
pub fn has_kernels(dtype: TensorType) -> bool {
    struct Has;
    impl ForBlock for Has {
        type Output = ();
        fn run<B: WeightBlock>(self) {}
    }
    for_block(dtype, Has).is_some()
}

/// Bytes a `[rows, cols]` weight matrix of `dtype` holds in memory once loaded: this
/// module's layout for its own types (which may keep scales unpacked), else candle's
/// (f32 for F32, the stored blocks for the rest).
pub fn resident_bytes(dtype: TensorType, rows: usize, cols: usize) -> u64 {
    struct Size(usize, usize);
    impl ForBlock for Size {
        type Output = u64;
        fn run<B: WeightBlock>(self) -> u64 {
            Matrix::<B>::bytes_for(self.0, self.1)
        }
    }
    for_block(dtype, Size(rows, cols)).unwrap_or_else(|| {
        let values = rows as u64 * cols as u64;
        values / dtype.block_size() as u64 * dtype.type_size() as u64
    })
}

/// Weight matrices that share their input (attention's Q, K and V; the MLP's gate
/// and up), multiplied as one stacked matrix when their type allows: one pass over
/// the input and one parallel dispatch instead of several. Each output row is computed
/// exactly as it would be alone.
pub enum Stacked {
    /// One matrix whose rows are the parts' rows in order.
    One(Linear),
    /// Parts of other types, multiplied one by one.
    Each(Vec<Linear>),
}

impl Stacked {
    pub fn new(parts: Vec<Arc<StoredTensor>>) -> Result<Self> {
        let refs: Vec<&StoredTensor> = parts.iter().map(|p| p.as_ref()).collect();
        match Linear::ours(&refs)? {
            Some(linear) => Ok(Stacked::One(linear)),
            None => Ok(Stacked::Each(
                parts.into_iter().map(Linear::new).collect::<Result<_>>()?,
            )),
        }
    }

    /// `x`: `[batch, seq, in]` → `[batch, seq, Σ rows_i]`, the parts' outputs side by
    /// side.
    pub fn apply(&self, x: &Hidden) -> Result<Hidden> {
        match self {
            Stacked::One(linear) => linear.apply(x),
            Stacked::Each(parts) => {
                let ys: Vec<Hidden> = parts.iter().map(|p| p.apply(x)).collect::<Result<_>>()?;
                Hidden::side_by_side(&ys)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// AVX-512 with VNNI (and BW); implies AVX2.
    Avx512,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// Arm's Advanced SIMD (every AArch64 CPU has it): the matrix kernels; the other
    /// kernels take the portable path there.
    Neon,
    Portable,
}

impl Simd {
    /// The path in use: the best this CPU supports, or a lesser one named by the
    /// `ALLMENDE_SIMD` environment variable (`avx512`, `avx2`, `neon`, `portable`) to
    /// compare paths on one machine. A path the CPU lacks gives the best it has.
    fn cached() -> Self {
        static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *SIMD.get_or_init(|| {
            let paths = Simd::supported();
            let asked = match std::env::var("ALLMENDE_SIMD").as_deref() {
                Ok("avx512") => Some(Simd::Avx512),
                Ok("avx2") => Some(Simd::Avx2),
                Ok("neon") => Some(Simd::Neon),
                Ok("portable") => Some(Simd::Portable),
                _ => None,
            };
            asked.filter(|a| paths.contains(a)).unwrap_or(paths[0])
        })
    }

    /// The paths this CPU can run, best first (the portable path last, always).
    fn supported() -> Vec<Simd> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                return vec![Simd::Avx512, Simd::Avx2, Simd::Portable];
            }
            if avx2 {
                return vec![Simd::Avx2, Simd::Portable];
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return vec![Simd::Neon, Simd::Portable];
        }
        vec![Simd::Portable]
    }

    /// The path's name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512-vnni",
            Simd::Avx2 => "avx2",
            Simd::Neon => "neon",
            Simd::Portable => "portable",
        }
    }

    /// The path the kernels use in this process.
    pub fn in_use() -> Self {
        Simd::cached()
    }

    /// The paths this CPU can run, best first.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Simd> {
        Simd::supported()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Shared checks for both kernels, run on random weights.
    //! (candle's own Q4_1/Q8_0 products quantize activations differently, so the
    //! reference is the exact product instead.)
    use super::*;

    /// The types this module has kernels for: those [`for_block`] registers.
    pub fn ours() -> Vec<TensorType> {
        TensorType::ALL
            .into_iter()
            .filter(|&d| has_kernels(d))
            .collect()
    }

    #[test]
    fn every_16_bit_and_common_quantized_type_has_kernels() {
        use TensorType::*;
        let expected = [
            F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K, IQ4_NL, BF16,
        ];
        assert_eq!(ours(), expected);
    }

    /// Every Arm CPU runs the NEON kernels, so the checks below compare them with the
    /// portable ones there.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn arm_cpus_run_the_neon_kernels() {
        assert_eq!(Simd::available(), [Simd::Neon, Simd::Portable]);
    }

    pub fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Random weights of `dtype`: quantized by candle, or for IQ4_NL, which candle
    /// cannot quantize, candle's Q4_0 blocks read as IQ4_NL's (the same layout: any
    /// f16 scale and 32 four-bit indices are a valid block).
    pub fn weights(dtype: TensorType, rows: usize, cols: usize) -> StoredTensor {
        let w = Tensor::randn(0f32, 0.5, (rows, cols), &Device::Cpu).unwrap();
        let quantize_as = dtype
            .candle()
            .unwrap_or(candle_core::quantized::GgmlDType::Q4_0);
        let q = candle_core::quantized::QTensor::quantize(&w, quantize_as).unwrap();
        StoredTensor {
            dtype,
            ..StoredTensor::of_candle(&q)
        }
    }

    /// The weights' values: candle's dequantization (ggml's), and for IQ4_NL ggml's
    /// `d × kvalues_iq4nl[q]` with the low nibbles first.
    pub fn dequantized(t: &StoredTensor) -> Vec<f32> {
        if t.dtype != TensorType::IQ4_NL {
            return values(&t.to_candle().unwrap().dequantize(&Device::Cpu).unwrap());
        }
        let mut out = Vec::with_capacity(t.bytes.len() / 18 * BLOCK);
        for block in t.bytes.chunks_exact(18) {
            let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            let nibbles = block[2..].iter().map(|b| b & 0x0F);
            let high = block[2..].iter().map(|b| b >> 4);
            out.extend(
                nibbles
                    .chain(high)
                    .map(|q| d * iq4_nl::KVALUES[q as usize] as f32),
            );
        }
        out
    }

    /// Small and odd shapes (rows, columns, tokens), each type's edge cases.
    const SHAPES: &[(usize, usize, usize)] = &[
        (96, 64, 1),
        (192, 576, 1),
        (70, 576, 5),
        (33, 96, 9),
        (8, 32, 2),
        (40, 2048, 8),
    ];

    /// A 1B-to-8B model's projections: long sums, where an accumulator's rounding
    /// or an integer overflow would show.
    const LARGE: &[(usize, usize, usize)] = &[(2048, 8192, 2), (8192, 2048, 2)];

    /// `build(weights, path)` makes the kernel's matrix computed on `path`.
    fn check(
        dtype: TensorType,
        shapes: &[(usize, usize, usize)],
        build: impl Fn(&StoredTensor, Simd) -> Linear,
    ) {
        // Rows of whole blocks (K-quants' are 256 values).
        let unit = dtype.block_size();
        for &(rows, cols, tokens) in shapes {
            let cols = cols.div_ceil(unit) * unit;
            let q = weights(dtype, rows, cols);
            let ours = build(&q, Simd::cached());
            let others: Vec<(Simd, Linear)> = Simd::available()
                .into_iter()
                .map(|s| (s, build(&q, s)))
                .collect();
            let w = dequantized(&q);
            let x = Tensor::randn(0f32, 1.0, (1, tokens, cols), &Device::Cpu).unwrap();
            let a = values(&ours.forward(&x).unwrap());
            let xs = values(&x);
            // Against the exact product of the (dequantized) weights and the
            // activations, within what 8-bit activations can cost: per block half a
            // quantization step (amax / 254) per unit of |w|, plus f16 scale rounding
            // (2^-10 relative) and f32 summation.
            for t in 0..tokens {
                let xt = &xs[t * cols..(t + 1) * cols];
                for r in 0..rows {
                    let wr = &w[r * cols..(r + 1) * cols];
                    let exact: f64 = wr.iter().zip(xt).map(|(&w, &x)| w as f64 * x as f64).sum();
                    let mut bound = 0f64;
                    for (wb, xb) in wr.chunks(32).zip(xt.chunks(32)) {
                        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        let size: f64 = wb.iter().map(|w| w.abs() as f64).sum();
                        let magnitude: f64 = wb
                            .iter()
                            .zip(xb)
                            .map(|(&w, &x)| (w as f64 * x as f64).abs())
                            .sum();
                        bound += size * amax / 254.0 + magnitude / 1024.0;
                    }
                    let ours = a[t * rows + r] as f64;
                    assert!(
                        (ours - exact).abs() <= bound * 1.01 + 1e-4,
                        "{ours} vs exact {exact} (bound {bound}, {rows}x{cols})"
                    );
                }
            }
            for (path, other) in &others {
                let c = values(&other.forward(&x).unwrap());
                assert!(
                    a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{path:?} differs ({rows}x{cols}, {tokens} tokens)"
                );
            }
            // A token's outputs do not depend on its batch.
            for t in [0, tokens - 1] {
                let alone = values(&ours.forward(&x.narrow(1, t, 1).unwrap()).unwrap());
                let batched = &a[t * rows..(t + 1) * rows];
                assert!(
                    alone
                        .iter()
                        .zip(batched)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "token {t} differs when batched ({rows}x{cols})"
                );
            }
        }
    }

    #[test]
    fn stacked_parts_equal_separate_matrices() {
        for dtype in ours().into_iter().chain([TensorType::Q2K]) {
            let parts: Vec<Arc<StoredTensor>> = [64, 32, 32]
                .into_iter()
                .map(|rows| Arc::new(weights(dtype, rows, 256)))
                .collect();
            let stacked = Stacked::new(parts.clone()).unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, 3, 256), &Device::Cpu).unwrap();
            let joined = stacked.apply(&Hidden::from_tensor(&x).unwrap()).unwrap();
            let joined = joined.into_tensor().unwrap();
            let mut start = 0;
            for part in parts {
                let alone = Linear::new(part).unwrap().forward(&x).unwrap();
                let n = alone.dims()[2];
                let out = joined.narrow(2, start, n).unwrap();
                assert_eq!(values(&alone), values(&out), "{dtype:?}");
                start += n;
            }
            assert_eq!(start, joined.dims()[2]);
        }
    }

    #[test]
    fn resident_bytes_are_what_a_loaded_matrix_holds() {
        struct Held<'a>(&'a StoredTensor);
        impl ForBlock for Held<'_> {
            type Output = u64;
            fn run<B: WeightBlock>(self) -> u64 {
                Matrix::<B>::from_stored(self.0).unwrap().bytes()
            }
        }
        for dtype in ours() {
            for (rows, cols) in [(48, 256), (33, 512)] {
                let q = weights(dtype, rows, cols);
                let held = for_block(dtype, Held(&q)).unwrap();
                assert_eq!(resident_bytes(dtype, rows, cols), held, "{dtype:?}");
            }
        }
        let stored = weights(TensorType::Q2K, 4, 256).to_candle().unwrap();
        let bytes = resident_bytes(TensorType::Q2K, 4, 256);
        assert_eq!(bytes, stored.storage_size_in_bytes() as u64);
    }

    #[test]
    fn no_tokens_give_an_empty_product() {
        for dtype in ours() {
            let linear = Linear::new(Arc::new(weights(dtype, 48, 256))).unwrap();
            assert!(matches!(linear, Linear::Ours(_)), "{dtype:?}");
            let x = Tensor::zeros((1, 0, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
            assert_eq!(linear.forward(&x).unwrap().dims(), &[1, 0, 48]);
        }
    }

    #[test]
    fn rows_equal_candles_dequantization() {
        for dtype in ours() {
            let q = Arc::new(weights(dtype, 10, 256));
            let ours = Linear::new(q.clone()).unwrap().rows(&[7, 0, 7]).unwrap();
            let all = Tensor::from_vec(dequantized(&q), (10, 256), &Device::Cpu).unwrap();
            let ids = Tensor::new(&[7u32, 0, 7], &Device::Cpu).unwrap();
            let theirs = all.index_select(&ids, 0).unwrap();
            assert_eq!(values(&ours), values(&theirs), "{dtype:?}");
            assert!(Linear::new(q).unwrap().rows(&[10]).is_err());
        }
    }

    /// `check` for block type `B` on every path.
    fn check_type<B: WeightBlock>() {
        check_shapes::<B>(SHAPES);
    }

    fn check_shapes<B: WeightBlock>(shapes: &[(usize, usize, usize)]) {
        check(B::DTYPE, shapes, |q, path| {
            Linear::Ours(Box::new(Matrix::<B>::from_stored(q).unwrap().on(path)))
        });
    }

    #[test]
    fn k_quants_on_large_matrices_agree_with_the_exact_product() {
        check_shapes::<q4_k::GroupQ4K>(LARGE);
        check_shapes::<q5_k::GroupQ5K>(LARGE);
        check_shapes::<q6_k::GroupQ6K>(LARGE);
    }

    #[test]
    fn q4_1_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<q4_1::GroupQ4_1>();
    }

    #[test]
    fn q8_0_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<q8_0::GroupQ8_0>();
    }

    #[test]
    fn iq4_nl_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<iq4_nl::GroupIq4Nl>();
    }

    #[test]
    fn q4_0_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<q4_0::GroupQ4_0>();
    }

    #[test]
    fn q5_0_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<q5_0::GroupQ5_0>();
    }

    #[test]
    fn q5_1_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<q5_1::GroupQ5_1>();
    }

    #[test]
    fn q4_k_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<q4_k::GroupQ4K>();
    }

    #[test]
    fn q5_k_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<q5_k::GroupQ5K>();
    }

    #[test]
    fn q6_k_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<q6_k::GroupQ6K>();
    }

    #[test]
    fn f16_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<float16::BlockF16>();
    }

    #[test]
    fn bf16_agrees_with_the_exact_product_and_is_the_same_on_every_path() {
        check_type::<float16::BlockBf16>();
    }
}
