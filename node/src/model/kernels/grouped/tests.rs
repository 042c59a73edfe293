//! Every path of every grouped format against the module's formula evaluated in f64
//! on the same quantized weights (candle's dequantization, which is ggml's) and
//! activations: only f32 rounding may differ.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::*;
use crate::model::kernels::tests::{dequantized, values, weights};
use crate::model::kernels::{q4_0, q4_k, q5_0, q5_1, q5_k, q6_k, Linear, Matrix, Simd};

fn formula<F: Format, const SUB: usize, const PLANES: usize>() {
    for (rows, cols, tokens) in [(48, 512, 3), (40, 2048, 9), (16, 256, 1), (20, 768, 8)] {
        let q = Arc::new(weights(F::DTYPE, rows, cols));
        let w = dequantized(&q);
        let x = Tensor::randn(0f32, 1.0, (1, tokens, cols), &Device::Cpu).unwrap();
        let xs = values(&x);
        for path in Simd::available() {
            let matrix = Matrix::<Group<F, SUB, PLANES>>::from_stored(&q)
                .unwrap()
                .on(path);
            let ours = values(&Linear::Ours(Box::new(matrix)).forward(&x).unwrap());
            for t in 0..tokens {
                let act = Acts::quantize(&xs[t * cols..][..cols], true);
                for r in 0..rows {
                    // f32 rounding is relative to the terms' magnitudes, not to their
                    // sum, which cancellation can bring near zero.
                    let (mut exact, mut magnitude) = (0f64, 0f64);
                    for (b, y) in act.blocks.iter().enumerate() {
                        let wb = &w[r * cols + b * BLOCK..][..BLOCK];
                        for (&w, &q) in wb.iter().zip(&y.qs) {
                            let term = w as f64 * y.d as f64 * q as f64;
                            exact += term;
                            magnitude += term.abs();
                        }
                    }
                    let got = ours[t * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * magnitude.max(1.0),
                        "{:?} {path:?}: {got} vs {exact} ({rows}x{cols}, row {r}, token {t})",
                        F::DTYPE
                    );
                }
            }
        }
    }
}

#[test]
fn q4_0_paths_compute_the_formula() {
    formula::<q4_0::Q4_0, 1, 0>();
}

#[test]
fn q5_0_paths_compute_the_formula() {
    formula::<q5_0::Q5_0, 1, 1>();
}

#[test]
fn q5_1_paths_compute_the_formula() {
    formula::<q5_1::Q5_1, 1, 1>();
}

#[test]
fn q4_k_paths_compute_the_formula() {
    formula::<q4_k::Q4K, 8, 0>();
}

#[test]
fn q5_k_paths_compute_the_formula() {
    formula::<q5_k::Q5K, 8, 1>();
}

#[test]
fn q6_k_paths_compute_the_formula() {
    formula::<q6_k::Q6K, 8, 2>();
}
