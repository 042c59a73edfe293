//! RMS norm of token rows with candle's arithmetic (`candle_nn::ops::rms_norm`, which
//! this model's outputs were checked with): per row the squares summed in f32 in
//! position order, `m = sqrt(sum / n + eps)`, then `x / m × weight`.
//!
//! The sum is a chain of dependent additions as long as the row (about a microsecond
//! for the test model's 576 values), and one row at a time the core waits on each. So
//! the rows of a batch are summed [`INTERLEAVED`] at a time, each in its own order:
//! the same bits, and eight rows take about the time of one or two.

/// Rows whose sums run side by side.
const INTERLEAVED: usize = 8;

/// `out = rms_norm(x) × weight` for rows of `weight.len()` values (`x` and `out` hold
/// whole rows).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    if n == 0 {
        return;
    }
    let mut rows = x.chunks_exact(n * INTERLEAVED);
    let mut outs = out.chunks_exact_mut(n * INTERLEAVED);
    for (x, out) in (&mut rows).zip(&mut outs) {
        let mut sums = [0f32; INTERLEAVED];
        for i in 0..n {
            for (r, sum) in sums.iter_mut().enumerate() {
                let v = x[r * n + i];
                *sum += v * v;
            }
        }
        for ((x, out), sum) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).zip(sums) {
            scale(x, weight, root(sum, n, eps), out);
        }
    }
    let rest = rows.remainder().chunks_exact(n);
    for (x, out) in rest.zip(outs.into_remainder().chunks_exact_mut(n)) {
        let sum = x.iter().map(|&v| v * v).sum::<f32>();
        scale(x, weight, root(sum, n, eps), out);
    }
}

fn root(sum: f32, n: usize, eps: f32) -> f32 {
    (sum / n as f32 + eps).sqrt()
}

fn scale(x: &[f32], weight: &[f32], m: f32, out: &mut [f32]) {
    for ((y, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *y = v / m * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn gives_candles_bits_for_any_number_of_rows() {
        let n = 576;
        for rows in [1, 3, 8, 9, 17, 40] {
            let x: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 7919 % 2003) as f32 - 1000.0) / 97.0)
                .collect();
            let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 13) as f32 / 10.0).collect();
            let mut ours = vec![0f32; x.len()];
            rms_norm(&x, &w, 1e-5, &mut ours);
            let xt = Tensor::from_vec(x, (rows, n), &Device::Cpu).unwrap();
            let wt = Tensor::from_vec(w, n, &Device::Cpu).unwrap();
            let theirs = candle_nn::ops::rms_norm(&xt, &wt, 1e-5).unwrap();
            let theirs = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ours), bits(&theirs), "{rows} rows");
        }
    }
}
