//! `Forwarded`: a step the previous server of a client's route sends on, handed to the
//! session it names on whichever stream serves that session (`forwarding.rs`).

use std::time::Instant;

use allmende_protocol::inference::{ForwardProof, NextHop};

use super::{Ctx, Next};
use crate::server::forwarding::{ForwardedStep, Undelivered};

/// Hands a step forwarded by the stream's peer to the session it names. Nothing is
/// answered on this stream: the session's client gets the output. A delivered step is
/// not counted against the sender's request rate (it is the session's client's step,
/// paced by that client). One that names no open session, or a wrong proof, is
/// dropped and counted, but never held against the sender: an honest server forwards
/// to whatever hop its client named, so a client could otherwise get it banned by
/// naming a session with a bad proof. Past the sender's rate this stream is closed,
/// without a ban. (A 128-bit proof cannot be guessed, so refusing costs nothing.)
pub fn apply(ctx: &Ctx<'_>, id: u64, proof: &ForwardProof, step: ForwardedStep) -> Next {
    let (server, peer) = (ctx.server, ctx.peer);
    let undelivered = match NextHop::check_list(&step.forward, &[ctx.me, ctx.them]) {
        Ok(()) => match server.inboxes.deliver(id, &peer, proof, step) {
            Ok(()) => return Next::Delivered,
            Err(undelivered) => undelivered,
        },
        Err(e) => {
            tracing::debug!(%peer, "a forwarded step with a bad list of hops: {e}");
            Undelivered::BadProof
        }
    };
    tracing::debug!(%peer, session = id, "forwarded step not delivered: {undelivered:?}");
    server.metrics.forwards_refused.inc();
    match server.guard(|g| g.within_rate(&peer, Instant::now())) {
        true => Next::Nothing,
        false => Next::Stop,
    }
}
