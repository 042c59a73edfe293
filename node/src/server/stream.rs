//! One inference stream: at most one session, driven by the client's messages and by
//! the steps the previous server of the client's route forwards into it; or a stream
//! from such a server, carrying forwarded steps to the sessions they name.
//!
//! The loop here reads a frame (within the node's frame budget, at the pace a peer
//! must keep), holds the message to the peer guard, hands it to its handler
//! (`handlers/`) and writes the reply. Every failure a peer can cause ends in an
//! `Error` reply or a closed stream, never a panic, and never touches other sessions:
//! bad frames close this stream, bad steps are refused and the session stays usable,
//! and an idle or vanished client's cache is dropped with the stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use allmende_protocol::{ClientMessage, ErrorKind, ServerMessage};
use libp2p::{PeerId, Stream};

use super::forwarding::{ForwardedStep, Forwarder};
use super::guard::{Offence, Verdict};
use super::handlers::{self, Ctx, Next};
use super::reply::{error, frame_of, Reply};
use super::session::OpenSession;
use super::share::PeerGroup;
use super::ShardServer;
use crate::network::framing::{
    decode_frame, write_frame, write_message, FrameIoError, FrameReader,
};
use crate::network::Network;

/// Whether the stream should go on after a guard verdict; bans the peer if so ruled.
pub async fn obey(verdict: Verdict, network: &Network, peer: PeerId) -> bool {
    match verdict {
        Verdict::Allow | Verdict::Refuse => true,
        Verdict::Ban(duration) => {
            let _ = network.ban(peer, duration).await;
            false
        }
    }
}

/// What woke a stream's task.
enum Woken {
    Frame(Result<Vec<u8>, FrameIoError>),
    Forwarded(ForwardedStep),
    Idle,
}

/// How long a frame of `len` bytes may take to arrive: a grace for the first bytes,
/// then the slowest upload a donor's peer may have. A slower frame holds its buffer
/// (and the node's frame budget) for nothing: its stream is closed.
fn frame_patience(len: usize) -> Duration {
    const GRACE: Duration = Duration::from_secs(10);
    const SLOWEST_BYTES_PER_SEC: u64 = 256 << 10;
    GRACE + Duration::from_secs(len as u64 / SLOWEST_BYTES_PER_SEC)
}

/// What a stream's task acts on next.
enum Input {
    Client(Result<ClientMessage<'static>, FrameIoError>),
    Forwarded(ForwardedStep),
    Idle,
}

pub async fn serve_stream(
    server: Arc<ShardServer>,
    network: Network,
    peer: PeerId,
    group: PeerGroup,
    mut stream: Stream,
) {
    let mut session: Option<OpenSession> = None;
    let mut reader = FrameReader::new(
        allmende_protocol::MAX_MESSAGE_BYTES,
        Some(server.frame_budget.for_group(group)),
    )
    .with_patience(frame_patience);
    let mut forwarder = Forwarder::default();
    let (me, them) = (network.peer_id().to_bytes(), peer.to_bytes());
    // Only progress keeps a stream open: a session that opens or computes, not
    // messages that cost the server little and hold a slot (an `Info` every minute).
    let mut deadline = tokio::time::Instant::now() + server.limits.idle_timeout;
    loop {
        // The reader keeps a frame's progress when a forwarded step wins.
        let woken = tokio::select! {
            read = reader.read_frame(&mut stream) => Woken::Frame(read),
            Some(step) = next_forwarded(&mut session) => Woken::Forwarded(step),
            _ = tokio::time::sleep_until(deadline) => Woken::Idle,
        };
        let input = match woken {
            // Decoded out of the select, so a large frame's decode (off the runtime)
            // cannot be dropped half-way by another branch.
            Woken::Frame(Ok(payload)) => Input::Client(decode_frame(payload).await),
            Woken::Frame(Err(e)) => Input::Client(Err(e)),
            Woken::Forwarded(step) => Input::Forwarded(step),
            Woken::Idle => Input::Idle,
        };
        let mut ctx = Ctx {
            server: &server,
            network: &network,
            peer,
            group,
            me: &me,
            them: &them,
            session: &mut session,
            forwarder: &mut forwarder,
        };
        let next = match input {
            Input::Idle => {
                tracing::debug!(%peer, "session idle for {:?}; closing", server.limits.idle_timeout);
                break;
            }
            Input::Forwarded(step) => handlers::step::apply_forwarded(&mut ctx, step).await,
            Input::Client(Err(FrameIoError::Closed)) => break,
            Input::Client(Err(FrameIoError::Io(e))) => {
                tracing::debug!(%peer, "stream error: {e}");
                break;
            }
            Input::Client(Err(FrameIoError::OverBudget(len))) => {
                // Not this peer's fault: frames from others fill the budget. The frame
                // was read to its end, so the stream (and its session) goes on.
                tracing::debug!(%peer, "no room for a frame of {len} bytes");
                let reason = "frames being received fill this server's budget".to_string();
                if write_message(&mut stream, &ServerMessage::Busy { reason })
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Input::Client(Err(FrameIoError::TooSlow(len))) => {
                tracing::debug!(%peer, "a frame of {len} bytes arrived too slowly; closing");
                server.metrics.slow_frames.inc();
                break;
            }
            Input::Client(Err(e)) => {
                // Oversized or undecodable frame: say why, then close the stream.
                tracing::info!(%peer, "bad frame: {e}");
                let reply = error(ErrorKind::BadRequest, e.to_string());
                let _ = write_message(&mut stream, &reply).await;
                let verdict = server.guard(|g| g.offend(&peer, Offence::BadFrame, Instant::now()));
                obey(verdict, &network, peer).await;
                break;
            }
            Input::Client(Ok(message)) => guarded(&mut ctx, message).await,
        };
        let reply = match next {
            Next::Reply(reply) => reply,
            Next::Delivered => {
                // A stream of forwarded steps never gets a reply; what it carries is
                // its progress, or it would close under a route in full use.
                deadline = tokio::time::Instant::now() + server.limits.idle_timeout;
                continue;
            }
            Next::Nothing => continue,
            Next::Stop => break,
        };
        if reply.as_ref().is_ok_and(Reply::is_progress) {
            deadline = tokio::time::Instant::now() + server.limits.idle_timeout;
        }
        let frame = match frame_of(reply).await {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!(%peer, "cannot encode a reply: {e}");
                break;
            }
        };
        if let Err(e) = write_frame(&mut stream, &frame).await {
            tracing::debug!(%peer, "cannot reply: {e}");
            break;
        }
    }
}

/// Handles one message from the stream's peer within its request rate.
async fn guarded(ctx: &mut Ctx<'_>, message: ClientMessage<'static>) -> Next {
    // Steps are paced by their session (one in flight) and scheduled fairly, so an
    // honest session at full speed is never throttled: they are counted only when
    // refused, below. A forwarded step is counted when it is not delivered (see
    // `handlers/forwarded.rs`).
    let step = matches!(
        message,
        ClientMessage::Forwarded { .. } | ClientMessage::Step { .. } | ClientMessage::Replay { .. }
    );
    let verdict = match step {
        true => Verdict::Allow,
        false => ctx
            .server
            .guard(|g| g.on_request(&ctx.peer, Instant::now())),
    };
    if verdict == Verdict::Refuse {
        let reply = (
            ErrorKind::RateLimited,
            "too many requests; slow down".into(),
        );
        return Next::Reply(Err(reply));
    }
    if !ctx.obey(verdict).await {
        return Next::Stop;
    }
    let next = handlers::dispatch(ctx, message).await;
    if step && matches!(next, Next::Reply(Err(_))) {
        // A refused step costs the server little, but a stream of them must not come
        // for free.
        let verdict = ctx
            .server
            .guard(|g| g.on_request(&ctx.peer, Instant::now()));
        if !ctx.obey(verdict).await {
            return Next::Stop;
        }
    }
    next
}

/// The next step forwarded into the stream's session; never resolves without one.
async fn next_forwarded(session: &mut Option<OpenSession>) -> Option<ForwardedStep> {
    match session {
        Some(open) => open.next_forwarded().await,
        None => std::future::pending().await,
    }
}

/// How long a refused stream is given to take its `Busy` answer and close.
const BUSY_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers a stream the node has no slot for with `Busy`, and closes it. What the
/// peer sends meanwhile is read and dropped, a few KB at a time, so that its first
/// message is written whole and it reads the answer (a stream closed under a peer's
/// write fails the write, and the answer is never read).
pub async fn say_busy(mut stream: Stream, reason: String) {
    use futures::AsyncReadExt;
    let busy = ServerMessage::Busy { reason };
    let answer = async {
        write_message(&mut stream, &busy).await?;
        let mut scratch = [0u8; 4096];
        while stream.read(&mut scratch).await? > 0 {}
        Ok::<_, FrameIoError>(())
    };
    let _ = tokio::time::timeout(BUSY_WRITE_TIMEOUT, answer).await;
}
