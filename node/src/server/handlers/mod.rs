//! One handler per kind of message a stream carries, as mini-redis has one file per
//! command: each `apply`s its message to the stream's [`Ctx`] and says what comes
//! next ([`Next`]). The stream loop (`stream.rs`) reads the message, holds it to the
//! peer guard's rate, [`dispatch`]es it and writes the reply; whether a session may
//! open is decided by admission (`admission.rs`), and how steps run on a session by
//! the session itself (`session.rs`).

mod close;
mod forwarded;
mod info;
mod open;
mod replay;
pub mod step;

use std::future::Future;
use std::sync::Arc;

use allmende_protocol::{ClientMessage, ErrorKind};
use libp2p::PeerId;

use super::forwarding::{ForwardedStep, Forwarder};
use super::guard::Verdict;
use super::reply::{Refusal, Reply};
use super::session::OpenSession;
use super::share::PeerGroup;
use super::ShardServer;
use crate::network::Network;

/// What a handler works with: the server, the stream's peer, and the stream's state.
pub struct Ctx<'a> {
    pub server: &'a Arc<ShardServer>,
    pub network: &'a Network,
    pub peer: PeerId,
    /// Whose fair share the stream's session and compute count in.
    pub group: PeerGroup,
    /// This server's and the stream's peer's ids, as lists of hops name them.
    pub me: &'a [u8],
    pub them: &'a [u8],
    /// The stream's session, once one is open: at most one per stream.
    pub session: &'a mut Option<OpenSession>,
    /// The stream kept to the next server of the session's route.
    pub forwarder: &'a mut Forwarder,
}

impl<'a> Ctx<'a> {
    /// The stream's session, if it is session `id`.
    fn session(&mut self, id: u64) -> Result<&mut OpenSession, Refusal> {
        match self.session.as_mut().filter(|s| s.id == id) {
            Some(open) => Ok(open),
            None => Err((
                ErrorKind::UnknownSession,
                format!("no session {id} on this stream"),
            )),
        }
    }

    /// Whether the stream goes on after a guard verdict; bans the peer if so ruled.
    /// The future borrows the network alone: the context is not `Sync` (its forwarder
    /// holds a stream), so a future holding it could not move between threads.
    pub fn obey(&self, verdict: Verdict) -> impl Future<Output = bool> + Send + 'a {
        super::stream::obey(verdict, self.network, self.peer)
    }
}

/// What the stream does after a message.
pub enum Next {
    Reply(Result<Reply, Refusal>),
    /// A forwarded step went to its session: progress, answered on another stream.
    Delivered,
    Nothing,
    Stop,
}

/// Which session a step is for, the client's id for it, and where it starts.
#[derive(Clone, Copy)]
pub struct StepAt {
    pub session: u64,
    pub step: u64,
    pub position: u32,
}

/// Hands a message from the stream's peer to its handler.
pub async fn dispatch(ctx: &mut Ctx<'_>, message: ClientMessage<'static>) -> Next {
    match message {
        ClientMessage::Info => info::apply(ctx),
        ClientMessage::Open {
            model,
            range,
            max_len,
            dtype,
        } => open::apply(ctx, model, range, max_len, dtype).await,
        ClientMessage::Step {
            session,
            step,
            position,
            hidden,
            forward,
        } => {
            let at = StepAt {
                session,
                step,
                position,
            };
            step::apply(ctx, at, hidden, forward).await
        }
        ClientMessage::Replay {
            session,
            step,
            position,
            steps,
        } => {
            let at = StepAt {
                session,
                step,
                position,
            };
            replay::apply(ctx, at, steps).await
        }
        ClientMessage::Close { session } => close::apply(ctx, session),
        ClientMessage::Forwarded {
            session,
            step,
            proof,
            position,
            hidden,
            forward,
        } => {
            let step = ForwardedStep {
                step,
                position,
                hidden,
                forward,
            };
            forwarded::apply(ctx, session, &proof, step)
        }
    }
}
