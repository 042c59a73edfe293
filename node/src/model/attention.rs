//! Attention of new positions against a session's cached keys and values: every
//! position of a prompt (against its causal prefix) and every decode step of a batch,
//! all at once. The query heads that share a KV head, over one chunk of a position's
//! visible history, are one task on the compute threads
//! ([`kernels::attend`](super::kernels::attend), reading the cache in place, each key
//! and value row once per group of heads). A prompt's position gets exactly the
//! arithmetic it would get as a decode step. As candle operations (two matrix
//! products, a mask, a scale, a softmax, with their allocations) it cost more than
//! its arithmetic: one thread for decode steps while the others waited, and for
//! prompts score matrices of positions² × heads to allocate, clear and mask.

use std::ops::Deref;

use candle_core::{bail, Device, Layout, Result, Storage, Tensor};

use super::kernels::attend::{self, Partial, Rows, CHUNK};
use super::kernels::Simd;

/// One new position: `q` is `[batch, heads, 1, head_dim]`; `k`, `v` are `[batch,
/// kv_heads, positions, head_dim]`, the cache it sees (views into it, ending with its
/// own position); query head `h` attends with KV head `h / (heads / kv_heads)`.
pub type Step<'a> = (&'a Tensor, &'a Tensor, &'a Tensor);

/// Most tasks (and chunk results, ~1 KB each) in one round over the compute threads:
/// bounds the memory of a long prompt (a 4,096-position prompt has 200,000 tasks per
/// layer).
const MAX_TASKS_PER_ROUND: usize = 8192;

/// The attention of each step, `[batch, 1, heads × head_dim]`, all of their heads
/// spread over the compute threads.
pub fn single_positions(steps: &[Step<'_>]) -> Result<Vec<Tensor>> {
    let checked: Vec<Checked<_>> = steps
        .iter()
        .map(|&(q, k, v)| check(q, k, v))
        .collect::<Result<_>>()?;
    let simd = Simd::in_use();
    let mut outputs = Vec::with_capacity(checked.len());
    let mut rest = &checked[..];
    while !rest.is_empty() {
        // As many steps as fit in a round (at least one).
        let (mut take, mut tasks) = (0, 0);
        while take < rest.len()
            && (take == 0 || tasks + rest[take].task_count() <= MAX_TASKS_PER_ROUND)
        {
            tasks += rest[take].task_count();
            take += 1;
        }
        let (round, later) = rest.split_at(take);
        rest = later;
        let mut tasks = Vec::with_capacity(tasks);
        for step in round {
            step.tasks(&mut tasks)?;
        }
        let partials = super::parallel_map(&tasks, |t| {
            attend::partial(t.q, t.hd, t.keys, t.values, t.scale, simd)
        });
        let mut partials: &[Partial] = &partials;
        for step in round {
            let (mine, others) = partials.split_at(step.task_count());
            partials = others;
            outputs.push(step.merge(mine)?);
        }
    }
    Ok(outputs)
}

/// A step whose shapes fit, with its cache read-locked for the computation.
struct Checked<'a, G> {
    q: Vec<f32>,
    k: (G, &'a Layout),
    v: (G, &'a Layout),
    b: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    positions: usize,
}

/// The query heads of one KV head of one batch row, over one chunk of positions.
struct Task<'a> {
    q: &'a [f32],
    hd: usize,
    keys: Rows<'a>,
    values: Rows<'a>,
    scale: f32,
}

/// `q`, `k`, `v` checked, their cache storage locked for reading.
fn check<'a>(
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
) -> Result<Checked<'a, impl Deref<Target = Storage> + 'a>> {
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
    if positions == 0 || hd == 0 {
        bail!("attention over an empty cache");
    }
    Ok(Checked {
        q: q.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
        k: k.storage_and_layout(),
        v: v.storage_and_layout(),
        b,
        nh,
        nkv,
        hd,
        positions,
    })
}

impl<G: Deref<Target = Storage>> Checked<'_, G> {
    /// Tasks of this step: one per batch row, KV head and chunk of positions.
    fn task_count(&self) -> usize {
        self.b * self.nkv * self.positions.div_ceil(CHUNK)
    }

    /// The step's output from its tasks' results, in task order.
    fn merge(&self, partials: &[Partial]) -> Result<Tensor> {
        let chunks = self.positions.div_ceil(CHUNK);
        let mut out = vec![0f32; self.b * self.nh * self.hd];
        let group_len = self.nh / self.nkv * self.hd;
        for (y, parts) in out.chunks_exact_mut(group_len).zip(partials.chunks(chunks)) {
            attend::merge(parts, y);
        }
        Tensor::from_vec(out, (self.b, 1, self.nh * self.hd), &Device::Cpu)
    }

    /// This step's tasks, by batch row, KV head and chunk, appended to `tasks`.
    fn tasks<'s>(&'s self, tasks: &mut Vec<Task<'s>>) -> Result<()> {
        let group = self.nh / self.nkv * self.hd;
        let scale = 1.0 / (self.hd as f32).sqrt();
        let (keys, ks) = cache_rows(&self.k, self.positions)?;
        let (values, vs) = cache_rows(&self.v, self.positions)?;
        for bi in 0..self.b {
            for g in 0..self.nkv {
                let rows = |base: Rows<'s>, s: [usize; 2]| Rows {
                    start: base.start + bi * s[0] + g * s[1],
                    ..base
                };
                for first in (0..self.positions).step_by(CHUNK) {
                    let n = CHUNK.min(self.positions - first);
                    let cut = |r: Rows<'s>| Rows {
                        count: n,
                        ..r.skip(first)
                    };
                    tasks.push(Task {
                        q: &self.q[(bi * self.nkv + g) * group..][..group],
                        hd: self.hd,
                        keys: cut(rows(keys, ks)),
                        values: cut(rows(values, vs)),
                        scale,
                    });
                }
            }
        }
        Ok(())
    }
}

/// A cache view as rows of `head_dim` contiguous values (those of batch row 0, KV
/// head 0), and its strides for batch rows and KV heads.
fn cache_rows<'s, G: Deref<Target = Storage>>(
    (storage, layout): &'s (G, &Layout),
    positions: usize,
) -> Result<(Rows<'s>, [usize; 2])> {
    let Storage::Cpu(cpu) = &**storage else {
        bail!("the cache is not in main memory");
    };
    let s = layout.stride();
    if s[3] != 1 {
        bail!("cache rows are not contiguous");
    }
    let rows = Rows {
        data: cpu.as_slice::<f32>()?,
        start: layout.start_offset(),
        stride: s[2],
        count: positions,
    };
    Ok((rows, [s[0], s[1]]))
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
            let ours = single_positions(&[(&q, &k, &v)]).unwrap().remove(0);
            let theirs = reference(&q, &k, &v, nh / nkv);
            let a = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let c = theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (x, y) in a.iter().zip(&c) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn many_steps_run_in_rounds_with_the_same_results() {
        let dev = &Device::Cpu;
        let step = |i: usize| {
            let t = |n: usize| {
                (Tensor::ones((1, n, 1, 16), candle_core::DType::F32, dev).unwrap() * i as f64)
                    .unwrap()
            };
            (t(6), t(3), t(3))
        };
        // 3,000 steps × 3 KV heads: more tasks than one round takes.
        let steps: Vec<_> = (0..3000).map(step).collect();
        assert!(steps.len() * 3 > MAX_TASKS_PER_ROUND);
        let refs: Vec<Step> = steps.iter().map(|(q, k, v)| (q, k, v)).collect();
        let together = single_positions(&refs).unwrap();
        assert_eq!(together.len(), steps.len());
        for i in [0, 2730, 2731, 2999] {
            let alone = single_positions(&refs[i..=i]).unwrap().remove(0);
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(bits(&together[i]), bits(&alone), "step {i}");
            assert!(bits(&alone).iter().all(|&y| y == i as f32));
        }
    }

    #[test]
    fn refuses_shapes_that_do_not_fit() {
        let dev = &Device::Cpu;
        let q = Tensor::zeros((1, 4, 1, 8), candle_core::DType::F32, dev).unwrap();
        let k = Tensor::zeros((1, 3, 5, 8), candle_core::DType::F32, dev).unwrap();
        assert!(single_positions(&[(&q, &k, &k)]).is_err());
        let q2 = Tensor::zeros((1, 4, 2, 8), candle_core::DType::F32, dev).unwrap();
        let k2 = Tensor::zeros((1, 2, 5, 8), candle_core::DType::F32, dev).unwrap();
        assert!(single_positions(&[(&q2, &k2, &k2)]).is_err());
    }
}
