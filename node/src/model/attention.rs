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

use candle_core::{bail, Result};

use super::kernels::attend::{self, Partial, Rows, Scoring, CHUNK};
use super::kernels::Simd;
use super::kv_cache::KvView;

/// One new position: `q` holds its queries, `[batch, heads, head_dim]`; `cache` is the
/// history it sees (ending with its own position). Query head `h` attends with KV
/// head `h / (heads / kv_heads)`.
#[derive(Clone, Copy)]
pub struct Step<'a> {
    pub q: &'a [f32],
    pub heads: usize,
    pub cache: KvView<'a>,
    /// What each score is multiplied by: `1 / sqrt(head_dim)` unless the model says
    /// otherwise (Gemma 3 27B).
    pub scale: f32,
    /// The cap of `cap × tanh(score / cap)` on each scaled score, where the model
    /// caps attention logits (Gemma 2).
    pub softcap: Option<f32>,
}

/// Most tasks (and chunk results, ~1 KB each) in one round over the compute threads:
/// bounds the memory of a long prompt (a 4,096-position prompt has 200,000 tasks per
/// layer).
const MAX_TASKS_PER_ROUND: usize = 8192;

/// The attention of each step, `[batch, heads × head_dim]`, all of their heads spread
/// over the compute threads.
pub fn single_positions(steps: &[Step<'_>]) -> Result<Vec<Vec<f32>>> {
    for step in steps {
        check(step)?;
    }
    let simd = Simd::in_use();
    let mut outputs = Vec::with_capacity(steps.len());
    let mut rest = steps;
    while !rest.is_empty() {
        // As many steps as fit in a round (at least one).
        let (mut take, mut tasks) = (0, 0);
        while take < rest.len()
            && (take == 0 || tasks + task_count(&rest[take]) <= MAX_TASKS_PER_ROUND)
        {
            tasks += task_count(&rest[take]);
            take += 1;
        }
        let (round, later) = rest.split_at(take);
        rest = later;
        let mut tasks = Vec::with_capacity(tasks);
        for step in round {
            push_tasks(step, &mut tasks);
        }
        let partials = super::parallel_map(&tasks, |t| {
            attend::partial(t.q, t.hd, t.keys, t.values, t.scoring, simd)
        });
        let mut partials: &[Partial] = &partials;
        for step in round {
            let (mine, others) = partials.split_at(task_count(step));
            partials = others;
            outputs.push(merge(step, mine));
        }
    }
    Ok(outputs)
}

/// The query heads of one KV head of one batch row, over one chunk of positions.
struct Task<'a> {
    q: &'a [f32],
    hd: usize,
    keys: Rows<'a>,
    values: Rows<'a>,
    scoring: Scoring,
}

fn check(step: &Step<'_>) -> Result<()> {
    let c = &step.cache;
    let (b, nkv, hd) = (c.shape.batch, c.shape.kv_heads, c.shape.head_dim);
    if step.q.len() != b * step.heads * hd {
        bail!(
            "{} query values do not fit {b} × {} heads of {hd}",
            step.q.len(),
            step.heads
        );
    }
    if nkv == 0 || !step.heads.is_multiple_of(nkv) {
        bail!(
            "{} query heads cannot share {nkv} key/value heads",
            step.heads
        );
    }
    if c.visible() == 0 || hd == 0 {
        bail!("attention over an empty cache");
    }
    let rows = b * nkv * c.capacity * hd;
    if c.positions > c.capacity || c.k.len() < rows || c.v.len() < rows {
        bail!(
            "the cache's keys and values do not hold {} positions",
            c.positions
        );
    }
    Ok(())
}

/// Tasks of a step: one per batch row, KV head and chunk of positions.
fn task_count(step: &Step<'_>) -> usize {
    let c = &step.cache;
    c.shape.batch * c.shape.kv_heads * c.visible().div_ceil(CHUNK)
}

/// The step's output from its tasks' results, in task order.
fn merge(step: &Step<'_>, partials: &[Partial]) -> Vec<f32> {
    let chunks = step.cache.visible().div_ceil(CHUNK);
    let mut out = vec![0f32; step.q.len()];
    let group_len = step.heads / step.cache.shape.kv_heads * step.cache.shape.head_dim;
    for (y, parts) in out.chunks_exact_mut(group_len).zip(partials.chunks(chunks)) {
        attend::merge(parts, y);
    }
    out
}

/// A step's tasks, by batch row, KV head and chunk, appended to `tasks`.
fn push_tasks<'s>(step: &Step<'s>, tasks: &mut Vec<Task<'s>>) {
    let c = step.cache;
    let (hd, nkv) = (c.shape.head_dim, c.shape.kv_heads);
    let group = step.heads / nkv * hd;
    let scoring = Scoring {
        scale: step.scale,
        softcap: step.softcap,
    };
    let visible = c.visible();
    for bi in 0..c.shape.batch {
        for g in 0..nkv {
            let rows = |data| Rows {
                data,
                start: c.offset(bi, g),
                stride: hd,
                count: visible,
            };
            for first in (0..visible).step_by(CHUNK) {
                let n = CHUNK.min(visible - first);
                let cut = |r: Rows<'s>| Rows {
                    count: n,
                    ..r.skip(first)
                };
                tasks.push(Task {
                    q: &step.q[(bi * nkv + g) * group..][..group],
                    hd,
                    keys: cut(rows(c.k)),
                    values: cut(rows(c.v)),
                    scoring,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::KvShape;
    use candle_core::{DType, Device, Tensor};
    use half::f16;

    /// The same attention as candle operations, scores soft-capped by `softcap`.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, n_rep: usize, softcap: Option<f32>) -> Tensor {
        let (b, nh, _, hd) = q.dims4().unwrap();
        let nkv = nh / n_rep;
        let q = q.reshape((b, nkv, n_rep, hd)).unwrap();
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
        if let Some(cap) = softcap {
            let cap = f64::from(cap);
            scores = ((scores / cap).unwrap().tanh().unwrap() * cap).unwrap();
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .reshape((b, nh * hd))
            .unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// `t` rounded to f16 and back, as the cache stores it.
    fn to_f16_values(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn f16s(t: &Tensor) -> Vec<f16> {
        values(t).into_iter().map(f16::from_f32).collect()
    }

    #[test]
    fn equals_candle_operations_within_rounding() {
        let dev = &Device::Cpu;
        // Scores of about ±1: a cap of 2 changes them.
        let caps = [None, Some(2.0)];
        for ((b, nh, nkv, positions, hd, capacity), softcap) in [
            (1, 9, 3, 17, 64, 32),
            (2, 4, 4, 1, 8, 4),
            (1, 6, 2, 300, 20, 512),
            (1, 8, 1, 200, 256, 256),
        ]
        .into_iter()
        .flat_map(|shape| caps.map(|cap| (shape, cap)))
        {
            let q = Tensor::randn(0f32, 1.0, (b, nh, 1, hd), dev).unwrap();
            // Caches larger than what is filled, as ShardCache keeps them.
            let kc = Tensor::randn(0f32, 1.0, (b, nkv, capacity, hd), dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (b, nkv, capacity, hd), dev).unwrap();
            // The cache holds f16; the reference gets the same values.
            let (kc, vc) = (to_f16_values(&kc), to_f16_values(&vc));
            let (kv, vv, qv) = (f16s(&kc), f16s(&vc), values(&q));
            let cache = KvView {
                k: &kv,
                v: &vv,
                shape: KvShape {
                    batch: b,
                    kv_heads: nkv,
                    head_dim: hd,
                },
                capacity,
                positions,
                first: 0,
            };
            let step = Step {
                q: &qv,
                heads: nh,
                cache,
                scale: 1.0 / (hd as f32).sqrt(),
                softcap,
            };
            let ours = single_positions(&[step]).unwrap().remove(0);
            let k = kc.narrow(2, 0, positions).unwrap();
            let v = vc.narrow(2, 0, positions).unwrap();
            let theirs = values(&reference(&q, &k, &v, nh / nkv, softcap));
            assert_eq!(ours.len(), theirs.len());
            for (x, y) in ours.iter().zip(&theirs) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    fn shape(kv_heads: usize, head_dim: usize) -> KvShape {
        KvShape {
            batch: 1,
            kv_heads,
            head_dim,
        }
    }

    #[test]
    fn many_steps_run_in_rounds_with_the_same_results() {
        // 3,000 steps × 3 KV heads: more tasks than one round takes. Step `i` has
        // every query, key and value equal to `i`, so its output is all `i` (as
        // the f16 cache holds it).
        let data: Vec<(Vec<f32>, Vec<f16>)> = (0..3000)
            .map(|i| {
                (
                    vec![i as f32; 6 * 16],
                    vec![f16::from_f32(i as f32); 3 * 16],
                )
            })
            .collect();
        let steps: Vec<Step> = data
            .iter()
            .map(|(q, kv)| Step {
                q,
                heads: 6,
                cache: KvView {
                    k: kv,
                    v: kv,
                    shape: shape(3, 16),
                    capacity: 1,
                    positions: 1,
                    first: 0,
                },
                scale: 0.25,
                softcap: None,
            })
            .collect();
        assert!(steps.len() * 3 > MAX_TASKS_PER_ROUND);
        let together = single_positions(&steps).unwrap();
        assert_eq!(together.len(), steps.len());
        for i in [0, 2730, 2731, 2999] {
            let alone = single_positions(&steps[i..=i]).unwrap().remove(0);
            assert_eq!(together[i], alone, "step {i}");
            let v = f16::from_f32(i as f32).to_f32();
            assert!(alone.iter().all(|&y| y == v));
        }
    }

    #[test]
    fn refuses_shapes_that_do_not_fit() {
        let (q, kv) = (vec![0f32; 4 * 8], vec![f16::ZERO; 3 * 5 * 8]);
        let cache = KvView {
            k: &kv,
            v: &kv,
            shape: shape(3, 8),
            capacity: 5,
            positions: 5,
            first: 0,
        };
        let step = |q, heads, cache| Step {
            q,
            heads,
            cache,
            scale: 1.0,
            softcap: None,
        };
        // Four query heads cannot share three KV heads.
        assert!(single_positions(&[step(&q, 4, cache)]).is_err());
        // Too few query values for six heads.
        assert!(single_positions(&[step(&q, 6, cache)]).is_err());
        // More positions than the cache holds.
        let q6 = vec![0f32; 6 * 8];
        let long = KvView {
            positions: 6,
            ..cache
        };
        assert!(single_positions(&[step(&q6, 6, long)]).is_err());
        let short = KvView {
            k: &kv[..10],
            ..cache
        };
        assert!(single_positions(&[step(&q6, 6, short)]).is_err());
        assert!(single_positions(&[step(&q6, 6, cache)]).is_ok());
    }
}
