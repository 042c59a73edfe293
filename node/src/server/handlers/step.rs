//! `Step`: one step of the session's sequence, computed and answered, its output also
//! forwarded to the next server of the client's route when the step names one
//! (`forwarding.rs`). A step the previous server forwards into the session runs the
//! same way.

use allmende_protocol::inference::NextHop;
use allmende_protocol::{ErrorKind, WireTensor};

use super::{Ctx, Next, StepAt};
use crate::server::forwarding::ForwardedStep;
use crate::server::reply::{Refusal, Reply};

pub async fn apply(
    ctx: &mut Ctx<'_>,
    at: StepAt,
    hidden: WireTensor<'static>,
    forward: Vec<NextHop>,
) -> Next {
    // A step the session computed last, forwarded, which the client sent too (it
    // tired of waiting for the forward): answered already.
    let seq = hidden.shape.get(1).map_or(0, |&s| s as usize);
    let repeated = ctx.session.as_ref().is_some_and(|open| {
        open.id == at.session
            && open.last_step == Some(at.step)
            && open.len() == Some(at.position as usize + seq)
    });
    if repeated {
        return Next::Nothing;
    }
    Next::Reply(run(ctx, at, hidden, forward).await)
}

/// A step forwarded into this stream's session: computed and answered to the
/// session's client as if it had sent the step itself. One no newer than the last
/// step computed came both ways (from the client too, which was answered), or from a
/// server the client has since moved away from: it is dropped.
pub async fn apply_forwarded(ctx: &mut Ctx<'_>, step: ForwardedStep) -> Next {
    let Some(open) = ctx.session.as_ref() else {
        return Next::Nothing;
    };
    if open.last_step.is_some_and(|last| step.step <= last) {
        return Next::Nothing;
    }
    let at = StepAt {
        session: open.id,
        step: step.step,
        position: step.position,
    };
    Next::Reply(run(ctx, at, step.hidden, step.forward).await)
}

/// Runs one step and, if it names the next servers, forwards its output to the first
/// of them before the reply goes out.
async fn run(
    ctx: &mut Ctx<'_>,
    at: StepAt,
    hidden: WireTensor<'_>,
    forward: Vec<NextHop>,
) -> Result<Reply, Refusal> {
    NextHop::check_list(&forward, &[ctx.me]).map_err(|e| (ErrorKind::BadRequest, e))?;
    let (server, group) = (ctx.server, ctx.group);
    let open = ctx.session(at.session)?;
    let input = open.validate(server, at.position, vec![hidden])?;
    let mut reply = open
        .compute(server, group, at.step, at.position, input)
        .await?;
    if let (
        Reply::Hidden {
            output,
            dtype,
            forwarded,
            ..
        },
        Some((next, rest)),
    ) = (&mut reply, forward.split_first())
    {
        *forwarded = ctx
            .forwarder
            .forward(
                ctx.network,
                (next, rest),
                at.step,
                at.position,
                output,
                *dtype,
            )
            .await;
        if forwarded.is_some() {
            server.metrics.steps_forwarded.inc();
            // The forward waits in its connection's task; writing the reply now would
            // wake the client's connection task, which then runs first (a task just
            // woken takes the runtime's next turn). Yielding lets the next server's
            // step leave first: on loopback, 60–115 µs sooner.
            tokio::task::yield_now().await;
        }
    }
    Ok(reply)
}
