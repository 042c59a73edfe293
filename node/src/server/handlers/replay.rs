//! `Replay`: a session's steps sent again at once (to a server taking over a route),
//! checked whole, joined into a few long forwards, and answered with all their
//! outputs.

use allmende_protocol::{ErrorKind, WireTensor};
use candle_core::Tensor;

use super::{Ctx, Next, StepAt};
use crate::server::reply::{Refusal, Reply};

/// Most positions of a replay's consecutive steps that run as one forward.
const MAX_JOINED_POSITIONS: usize = 512;

pub async fn apply(ctx: &mut Ctx<'_>, at: StepAt, steps: Vec<WireTensor<'static>>) -> Next {
    Next::Reply(run(ctx, at, steps).await)
}

async fn run(ctx: &mut Ctx<'_>, at: StepAt, steps: Vec<WireTensor<'_>>) -> Result<Reply, Refusal> {
    let (server, group) = (ctx.server, ctx.group);
    let open = ctx.session(at.session)?;
    let inputs = open.validate(server, at.position, steps)?;
    let inputs = join_steps(inputs, MAX_JOINED_POSITIONS)?;
    open.compute(server, group, at.step, at.position, inputs)
        .await
}

/// A replay's consecutive steps joined into forwards of up to `max` positions each (a
/// longer step stays alone): they then run as a few prompts instead of one forward
/// per step, with the same results bit for bit, since a position's result does not
/// depend on how its sequence was cut into steps (`tests/batching.rs`).
fn join_steps(inputs: Vec<Tensor>, max: usize) -> Result<Vec<Tensor>, Refusal> {
    let join = |group: &mut Vec<Tensor>| match group.len() {
        1 => Ok(group.remove(0)),
        _ => {
            Tensor::cat(&std::mem::take(group), 1).map_err(|e| (ErrorKind::Internal, e.to_string()))
        }
    };
    let (mut joined, mut group, mut positions) = (Vec::new(), Vec::new(), 0);
    for input in inputs {
        let n = input.dim(1).unwrap_or(0);
        if !group.is_empty() && positions + n > max {
            joined.push(join(&mut group)?);
            positions = 0;
        }
        positions += n;
        group.push(input);
    }
    if !group.is_empty() {
        joined.push(join(&mut group)?);
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_consecutive_steps_up_to_the_limit() {
        let steps = |lens: &[usize]| -> Vec<Tensor> {
            let mut next = 0f32;
            lens.iter()
                .map(|&n| {
                    let values: Vec<f32> = (0..n * 2)
                        .map(|_| {
                            next += 1.0;
                            next
                        })
                        .collect();
                    Tensor::from_vec(values, (1, n, 2), &candle_core::Device::Cpu).unwrap()
                })
                .collect()
        };
        let lens = |ts: &[Tensor]| ts.iter().map(|t| t.dim(1).unwrap()).collect::<Vec<_>>();
        let joined = join_steps(steps(&[1, 1, 1, 3, 1, 9, 2]), 4).unwrap();
        assert_eq!(lens(&joined), [3, 4, 9, 2]);
        // The positions keep their order.
        let all = Tensor::cat(&joined, 1).unwrap().flatten_all().unwrap();
        let values = all.to_vec1::<f32>().unwrap();
        assert!(values.windows(2).all(|w| w[1] == w[0] + 1.0));
        assert_eq!(lens(&join_steps(steps(&[5]), 4).unwrap()), [5]);
    }
}
