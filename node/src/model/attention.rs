//! Attention of one new position against a session's cached keys and values: the
//! decode step. Written out as loops over the cache in place, because as candle
//! operations (two small matrix products, a scale, a softmax, with their allocations
//! and dispatch) it cost more than its arithmetic, and the more so the longer the
//! history and the more sessions share a batch.

use candle_core::{bail, Device, Result, Storage, Tensor};

/// `q`: `[batch, heads, 1, head_dim]`; `k`, `v`: `[batch, kv_heads, positions,
/// head_dim]` (views into a cache); query head `h` attends with KV head
/// `h / (heads / kv_heads)`. Returns `[batch, 1, heads × head_dim]`.
pub fn single_position(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, nh, one, hd) = q.dims4()?;
    let (kb, nkv, positions, khd) = k.dims4()?;
    if one != 1 || kb != b || khd != hd || v.dims4()? != (b, nkv, positions, hd) {
        bail!(
            "attention shapes do not fit: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if nkv == 0 || nh % nkv != 0 {
        bail!("{nh} query heads cannot share {nkv} key/value heads");
    }
    let n_rep = nh / nkv;
    let q = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let (k_guard, k_layout) = k.storage_and_layout();
    let (v_guard, v_layout) = v.storage_and_layout();
    let (Storage::Cpu(k_storage), Storage::Cpu(v_storage)) = (&*k_guard, &*v_guard) else {
        bail!("the cache is not in main memory");
    };
    let (keys, values) = (k_storage.as_slice::<f32>()?, v_storage.as_slice::<f32>()?);
    // A cache view: rows of `hd` contiguous values, `stride[2]` apart.
    let strides = |l: &candle_core::Layout| -> Result<(usize, [usize; 3])> {
        let s = l.stride();
        if s[3] != 1 {
            bail!("cache rows are not contiguous");
        }
        Ok((l.start_offset(), [s[0], s[1], s[2]]))
    };
    let (k_start, ks) = strides(k_layout)?;
    let (v_start, vs) = strides(v_layout)?;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; b * nh * hd];
    let mut scores = vec![0f32; positions];
    for bi in 0..b {
        for h in 0..nh {
            let g = h / n_rep;
            let qh = &q[(bi * nh + h) * hd..][..hd];
            let k_base = k_start + bi * ks[0] + g * ks[1];
            let v_base = v_start + bi * vs[0] + g * vs[1];
            let mut max = f32::NEG_INFINITY;
            for (j, score) in scores.iter_mut().enumerate() {
                let kj = &keys[k_base + j * ks[2]..][..hd];
                *score = dot(qh, kj) * scale;
                max = max.max(*score);
            }
            let mut sum = 0f32;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                sum += *score;
            }
            let y = &mut out[(bi * nh + h) * hd..][..hd];
            for (j, &p) in scores.iter().enumerate() {
                let vj = &values[v_base + j * vs[2]..][..hd];
                for (y, &v) in y.iter_mut().zip(vj) {
                    *y += p * v;
                }
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
        }
    }
    Tensor::from_vec(out, (b, 1, nh * hd), &Device::Cpu)
}

/// [`single_position`] for each `Some` of `inputs` (`q`, `k`, `v`), spread over the
/// compute threads; `None` where the input is `None`.
pub fn single_positions(
    inputs: &[Option<&(Tensor, Tensor, Tensor)>],
) -> Result<Vec<Option<Tensor>>> {
    super::parallel_map(inputs, |input| {
        input.map(|(q, k, v)| single_position(q, k, v)).transpose()
    })
    .into_iter()
    .collect()
}

/// A dot product in eight independent partial sums (which the compiler vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a
        .chunks_exact(8)
        .remainder()
        .iter()
        .zip(b.chunks_exact(8).remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same attention as candle operations, as the model computes it for prompts.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, n_rep: usize) -> Tensor {
        let (b, nh, _, hd) = q.dims4().unwrap();
        let nkv = nh / n_rep;
        let q = q.reshape((b, nkv, n_rep, hd)).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .reshape((b, 1, nh * hd))
            .unwrap()
    }

    #[test]
    fn equals_candle_operations_within_rounding() {
        let dev = &Device::Cpu;
        for (b, nh, nkv, positions, hd, capacity) in [
            (1, 9, 3, 17, 64, 32),
            (2, 4, 4, 1, 8, 4),
            (1, 6, 2, 300, 20, 512),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, nh, 1, hd), dev).unwrap();
            // Views into larger caches, as ShardCache hands them out.
            let kc = Tensor::randn(0f32, 1.0, (b, nkv, capacity, hd), dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (b, nkv, capacity, hd), dev).unwrap();
            let k = kc.narrow(2, 0, positions).unwrap();
            let v = vc.narrow(2, 0, positions).unwrap();
            let ours = single_position(&q, &k, &v).unwrap();
            let theirs = reference(&q, &k, &v, nh / nkv);
            let a = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let c = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (x, y) in a.iter().zip(&c) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn refuses_shapes_that_do_not_fit() {
        let dev = &Device::Cpu;
        let q = Tensor::zeros((1, 4, 1, 8), candle_core::DType::F32, dev).unwrap();
        let k = Tensor::zeros((1, 3, 5, 8), candle_core::DType::F32, dev).unwrap();
        assert!(single_position(&q, &k, &k).is_err());
        let q2 = Tensor::zeros((1, 4, 2, 8), candle_core::DType::F32, dev).unwrap();
        let k2 = Tensor::zeros((1, 2, 5, 8), candle_core::DType::F32, dev).unwrap();
        assert!(single_position(&q2, &k2, &k2).is_err());
    }
}
