//! One inference stream: at most one session, driven by the client's messages and by
//! the steps the previous server of the client's route forwards into it; or a stream
//! from such a server, carrying forwarded steps to the sessions they name.
//!
//! Every failure a peer can cause ends in an `Error` reply or a closed stream, never a
//! panic, and never touches other sessions: bad frames close this stream, bad steps are
//! refused and the session stays usable, and an idle or vanished client's cache is
//! dropped with the stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use allmende_protocol::inference::{ForwardLink, ForwardProof, NextHop};
use allmende_protocol::{
    encode_frame, ClientMessage, ErrorKind, LayerRange, ModelId, ServerMessage, WireDType,
    WireTensor,
};
use candle_core::{Device, Tensor};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::forwarding::{ForwardedStep, Forwarder, Registration, Undelivered};
use super::guard::{Offence, Verdict};
use super::share::PeerGroup;
use super::{NoSlot, ShardServer, ShareSlot, SlotKind};
use crate::model::{candle_message, with_values, ForwardError, ShardCache};
use crate::network::framing::{
    decode_frame, write_frame, write_message, FrameIoError, FrameReader, INLINE_CODEC_BYTES,
};
use crate::network::Network;

struct OpenSession {
    id: u64,
    dtype: WireDType,
    /// `None` only if the compute worker died holding it.
    cache: Option<ShardCache>,
    /// Steps forwarded into the session by the previous server of its route.
    inbox: mpsc::Receiver<ForwardedStep>,
    /// The id of the last step computed; forwarded steps must be newer.
    last_step: Option<u64>,
    _registration: Registration,
    _slot: ShareSlot,
    _kv_reservation: OwnedSemaphorePermit,
    _peer_slot: PeerSlot,
}

/// One of a peer's sessions, counted in the per-peer limit until dropped.
struct PeerSlot {
    server: Arc<ShardServer>,
    peer: PeerId,
    group: PeerGroup,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.server.guard(|g| g.on_close(&self.peer));
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        // Only a session that held a KV cache freed enough to be worth a trim: a
        // refused `Open` frees nothing.
        super::memory::session_ended();
    }
}

/// Whether the stream should go on after a guard verdict; bans the peer if so ruled.
async fn obey(verdict: Verdict, network: &Network, peer: PeerId) -> bool {
    match verdict {
        Verdict::Allow | Verdict::Refuse => true,
        Verdict::Ban(duration) => {
            let _ = network.ban(peer, duration).await;
            false
        }
    }
}

type Refusal = (ErrorKind, String);

/// What the server answers a request with.
enum Reply {
    Message(ServerMessage<'static>),
    /// A step's output, sent as hidden states in the session's wire type.
    Hidden {
        step: u64,
        position: u32,
        output: Tensor,
        dtype: WireDType,
        draining: bool,
        /// The output also went on to the next server of the route, over this link.
        forwarded: Option<ForwardLink>,
    },
}

impl Reply {
    /// The reply as a frame. An output's values are encoded straight from the
    /// tensor's memory: their one copy on the way out.
    fn frame(self) -> Result<Vec<u8>, Refusal> {
        let internal = |e: String| (ErrorKind::Internal, e);
        match self {
            Reply::Message(message) => encode_frame(&message).map_err(|e| internal(e.to_string())),
            Reply::Hidden {
                step,
                position,
                output,
                dtype,
                draining,
                forwarded,
            } => {
                let dims: Vec<u32> = output.dims().iter().map(|&d| d as u32).collect();
                let frame = with_values(&output, |values| {
                    let hidden =
                        WireTensor::new(&dims, values, dtype).map_err(|e| e.to_string())?;
                    let message = ServerMessage::Hidden {
                        step,
                        position,
                        hidden,
                        draining,
                        forwarded,
                    };
                    encode_frame(&message).map_err(|e| e.to_string())
                });
                frame
                    .map_err(|e| internal(candle_message(&e)))?
                    .map_err(internal)
            }
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

/// What to do after a message.
enum Next {
    Reply(Result<Reply, Refusal>),
    /// A forwarded step went to its session: progress, answered on another stream.
    Delivered,
    Nothing,
    Stop,
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
        let mut out = Outputs {
            server: &server,
            network: &network,
            forwarder: &mut forwarder,
            group,
            me: &me,
            them: &them,
        };
        let next = match input {
            Input::Idle => {
                tracing::debug!(%peer, "session idle for {:?}; closing", server.limits.idle_timeout);
                break;
            }
            Input::Forwarded(step) => out.forwarded(&mut session, step).await,
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
            Input::Client(Ok(message)) => out.message(&mut session, peer, message).await,
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
        let progress = match &reply {
            Ok(Reply::Hidden { .. }) => true,
            Ok(Reply::Message(m)) => matches!(m, ServerMessage::Opened { .. }),
            Err(_) => false,
        };
        if progress {
            deadline = tokio::time::Instant::now() + server.limits.idle_timeout;
        }
        let frame = match reply.map(encode_reply) {
            Ok(encoding) => encoding.await,
            Err(refusal) => Err(refusal),
        };
        let frame = match frame {
            Ok(frame) => Ok(frame),
            Err((kind, message)) => encode_frame(&error(kind, message)),
        };
        let frame = match frame {
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

/// The reply as a frame: encoded inline when small, else on a blocking thread.
async fn encode_reply(reply: Reply) -> Result<Vec<u8>, Refusal> {
    let bytes = match &reply {
        Reply::Hidden { output, .. } => output.elem_count() * 4,
        Reply::Message(_) => 0,
    };
    if bytes <= INLINE_CODEC_BYTES {
        return reply.frame();
    }
    tokio::task::spawn_blocking(move || reply.frame())
        .await
        .map_err(|e| (ErrorKind::Internal, e.to_string()))?
}

/// The next step forwarded into the stream's session; never resolves without one.
async fn next_forwarded(session: &mut Option<OpenSession>) -> Option<ForwardedStep> {
    match session {
        Some(open) => open.inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// Where a stream's results go: the server's state, and the next server of a route.
struct Outputs<'a> {
    server: &'a Arc<ShardServer>,
    network: &'a Network,
    forwarder: &'a mut Forwarder,
    /// Whose fair share the stream's session and compute count in.
    group: PeerGroup,
    /// This server's and the stream's peer's ids, as lists of hops name them.
    me: &'a [u8],
    them: &'a [u8],
}

impl Outputs<'_> {
    /// Handles one message from the stream's peer.
    async fn message(
        &mut self,
        session: &mut Option<OpenSession>,
        peer: PeerId,
        message: ClientMessage<'static>,
    ) -> Next {
        let (server, network) = (self.server, self.network);
        // Steps are paced by their session (one in flight) and scheduled fairly, so
        // an honest session at full speed is never throttled: they are counted only
        // when refused, below. A forwarded step is counted when it is not delivered
        // (see `deliver`).
        let step = matches!(
            message,
            ClientMessage::Forwarded { .. }
                | ClientMessage::Step { .. }
                | ClientMessage::Replay { .. }
        );
        let verdict = match step {
            true => Verdict::Allow,
            false => server.guard(|g| g.on_request(&peer, Instant::now())),
        };
        if verdict == Verdict::Refuse {
            let reply = (
                ErrorKind::RateLimited,
                "too many requests; slow down".into(),
            );
            return Next::Reply(Err(reply));
        }
        if !obey(verdict, network, peer).await {
            return Next::Stop;
        }
        let reply = match message {
            ClientMessage::Info => Ok(Reply::Message(ServerMessage::Info(server.info()))),
            ClientMessage::Open {
                model,
                range,
                max_len,
                dtype,
            } => {
                let verdict = server.guard(|g| g.on_open(&peer, Instant::now()));
                if !obey(verdict, network, peer).await {
                    return Next::Stop;
                }
                match verdict {
                    Verdict::Allow => {
                        let slot = PeerSlot {
                            server: server.clone(),
                            peer,
                            group: self.group,
                        };
                        open(server, session, slot, model, range, max_len, dtype)
                            .map(Reply::Message)
                    }
                    _ => Ok(Reply::Message(ServerMessage::Busy {
                        reason: format!(
                            "this peer already holds {} sessions here",
                            server.limits.peers.sessions_per_peer
                        ),
                    })),
                }
            }
            ClientMessage::Step {
                session: id,
                step,
                position,
                hidden,
                forward,
            } => {
                // A step the session computed last, forwarded, which the client sent
                // too (it tired of waiting for the forward): answered already.
                let seq = hidden.shape.get(1).map_or(0, |&s| s as usize);
                let repeated = session.as_ref().is_some_and(|open| {
                    open.id == id
                        && open.last_step == Some(step)
                        && open.cache.as_ref().map(ShardCache::len) == Some(position as usize + seq)
                });
                if repeated {
                    return Next::Nothing;
                }
                let step = Step { id, step, position };
                self.step(session, step, hidden, forward).await
            }
            ClientMessage::Replay {
                session: id,
                step,
                position,
                steps,
            } => {
                let step = Step { id, step, position };
                run(server, self.group, session, step, steps).await
            }
            ClientMessage::Close { session: id } => {
                if session.as_ref().is_some_and(|s| s.id == id) {
                    *session = None;
                    return Next::Nothing;
                }
                Err((
                    ErrorKind::UnknownSession,
                    format!("no session {id} on this stream"),
                ))
            }
            ClientMessage::Forwarded {
                session: id,
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
                return self.deliver(peer, id, &proof, step).await;
            }
        };
        if reply.is_err() && step {
            // A refused step costs the server little, but a stream of them must not
            // come for free.
            let verdict = server.guard(|g| g.on_request(&peer, Instant::now()));
            if !obey(verdict, network, peer).await {
                return Next::Stop;
            }
        }
        Next::Reply(reply)
    }

    /// Hands a step forwarded by `peer` to the session it names, on whichever stream
    /// serves it. Nothing is answered on this stream: the session's client gets the
    /// output. A delivered step is not counted against the sender's request rate (it
    /// is the session's client's step, paced by that client). One that names no open
    /// session, or a wrong proof, is dropped and counted, but never held against the
    /// sender: an honest server forwards to whatever hop its client named, so a client
    /// could otherwise get it banned by naming a session with a bad proof. Past the
    /// sender's rate this stream is closed, without a ban. (A 128-bit proof cannot be
    /// guessed, so refusing costs nothing.)
    async fn deliver(
        &mut self,
        peer: PeerId,
        id: u64,
        proof: &ForwardProof,
        step: ForwardedStep,
    ) -> Next {
        let server = self.server;
        let undelivered = match NextHop::check_list(&step.forward, &[self.me, self.them]) {
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

    /// A step forwarded into this stream's session: computed and answered to the
    /// session's client as if it had sent the step itself. One no newer than the last
    /// step computed came both ways (from the client too, which was answered), or from
    /// a server the client has since moved away from: it is dropped.
    async fn forwarded(&mut self, session: &mut Option<OpenSession>, step: ForwardedStep) -> Next {
        let Some(open) = session.as_ref() else {
            return Next::Nothing;
        };
        if open.last_step.is_some_and(|last| step.step <= last) {
            return Next::Nothing;
        }
        let id = Step {
            id: open.id,
            step: step.step,
            position: step.position,
        };
        Next::Reply(self.step(session, id, step.hidden, step.forward).await)
    }

    /// Runs one step and, if it names the next servers, forwards its output to the
    /// first of them before the reply goes out.
    async fn step(
        &mut self,
        session: &mut Option<OpenSession>,
        step: Step,
        hidden: WireTensor<'_>,
        forward: Vec<NextHop>,
    ) -> Result<Reply, Refusal> {
        NextHop::check_list(&forward, &[self.me]).map_err(|e| (ErrorKind::BadRequest, e))?;
        let mut reply = run(self.server, self.group, session, step, vec![hidden]).await?;
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
            *forwarded = self
                .forwarder
                .forward(
                    self.network,
                    (next, rest),
                    step.step,
                    step.position,
                    output,
                    *dtype,
                )
                .await;
            if forwarded.is_some() {
                self.server.metrics.steps_forwarded.inc();
                // The forward waits in its connection's task; writing the reply now
                // would wake the client's connection task, which then runs first (a
                // task just woken takes the runtime's next turn). Yielding lets the
                // next server's step leave first: on loopback, 60–115 µs sooner.
                tokio::task::yield_now().await;
            }
        }
        Ok(reply)
    }
}

/// Which session a step is for, the client's id for it, and where it starts.
#[derive(Clone, Copy)]
struct Step {
    id: u64,
    step: u64,
    position: u32,
}

fn error(kind: ErrorKind, message: String) -> ServerMessage<'static> {
    let message = allmende_protocol::inference::cut_reason(message);
    ServerMessage::Error { kind, message }
}

fn open(
    server: &ShardServer,
    session: &mut Option<OpenSession>,
    peer_slot: PeerSlot,
    model: ModelId,
    range: LayerRange,
    max_len: u32,
    dtype: WireDType,
) -> Result<ServerMessage<'static>, Refusal> {
    if session.is_some() {
        return Err((
            ErrorKind::BadRequest,
            "a session is already open on this stream".into(),
        ));
    }
    if server.is_draining() {
        return Err((
            ErrorKind::ShuttingDown,
            "this server is shutting down".into(),
        ));
    }
    if model != server.model {
        let msg = format!("this server serves model {}", server.model.short());
        return Err((ErrorKind::WrongModel, msg));
    }
    let max_len = (max_len as usize).min(server.limits.max_session_len);
    if max_len == 0 {
        return Err((ErrorKind::BadRequest, "max_len must be positive".into()));
    }
    let Some(cache) = server.shard.new_cache_for(range, max_len) else {
        let msg = format!(
            "layers {range} are not within this server's {}",
            server.shard.range()
        );
        return Err((ErrorKind::WrongModel, msg));
    };
    let slot = match peer_slot
        .server
        .take_slot(SlotKind::Session, peer_slot.group)
    {
        Ok(slot) => slot,
        Err(why) => {
            server.metrics.busy_refusals.inc();
            let reason = match why {
                NoSlot::Full => format!("all {} sessions are in use", server.limits.max_sessions),
                NoSlot::OverShare => "this address holds its fair share of sessions here".into(),
            };
            return Ok(ServerMessage::Busy { reason });
        }
    };
    let bytes = server.kv_bytes_per_position(range.len()) * cache.max_len() as u64;
    let kib = bytes.div_ceil(1024).min(u32::MAX as u64) as u32;
    let Ok(kv_reservation) = server.kv_budget.clone().try_acquire_many_owned(kib) else {
        server.metrics.busy_refusals.inc();
        return Ok(ServerMessage::Busy {
            reason: format!(
                "the KV-cache budget of {} MiB cannot hold {} more positions",
                server.limits.kv_cache_bytes >> 20,
                cache.max_len()
            ),
        });
    };
    server.metrics.sessions_opened.inc();
    let id = server
        .next_session
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let max_len = cache.max_len() as u32;
    let (registration, inbox, token) = server.inboxes.register(id).map_err(|e| {
        (
            ErrorKind::Internal,
            format!("cannot make a session token: {e}"),
        )
    })?;
    *session = Some(OpenSession {
        id,
        dtype,
        cache: Some(cache),
        inbox,
        last_step: None,
        _registration: registration,
        _slot: slot,
        _kv_reservation: kv_reservation,
        _peer_slot: peer_slot,
    });
    Ok(ServerMessage::Opened {
        session: id,
        max_len,
        token,
    })
}

/// Runs `steps` in order on the session (one for a plain step, several for a replay)
/// and replies with their outputs concatenated along the sequence axis. Steps that
/// start before the session's end replace what it held from there on.
async fn run(
    server: &ShardServer,
    group: PeerGroup,
    session: &mut Option<OpenSession>,
    Step { id, step, position }: Step,
    steps: Vec<WireTensor<'_>>,
) -> Result<Reply, Refusal> {
    let Some(open) = session.as_mut().filter(|s| s.id == id) else {
        return Err((
            ErrorKind::UnknownSession,
            format!("no session {id} on this stream"),
        ));
    };
    let Some(mut cache) = open.cache.take() else {
        return Err((ErrorKind::Internal, "the session lost its cache".into()));
    };
    let inputs = validate(server, &cache, position, steps)
        .and_then(|inputs| join_steps(inputs, MAX_JOINED_POSITIONS));
    let inputs = match inputs {
        Ok(inputs) => inputs,
        Err(refusal) => {
            open.cache = Some(cache);
            return Err(refusal);
        }
    };
    cache.truncate(position as usize);
    open.last_step = Some(step);
    let mut outputs = Vec::with_capacity(inputs.len());
    for input in inputs {
        let positions = input.dim(1).unwrap_or(0) as u64;
        let started = std::time::Instant::now();
        let (back, result) = match server.compute.run(group, input, cache).await {
            Ok(done) => done,
            Err(e) => return Err((ErrorKind::Internal, e.to_string())),
        };
        cache = back;
        server.metrics.steps.inc();
        server.metrics.positions.inc_by(positions);
        server
            .metrics
            .step_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(out) => outputs.push(out),
            Err(e) => {
                open.cache = Some(cache);
                return Err((forward_error_kind(&e), e.to_string()));
            }
        }
    }
    open.cache = Some(cache);
    let internal = |e: String| (ErrorKind::Internal, e);
    // A plain step (the common case) needs no concatenation copy.
    let output = match outputs.len() {
        1 => outputs.swap_remove(0),
        _ => Tensor::cat(&outputs, 1).map_err(|e| internal(e.to_string()))?,
    };
    Ok(Reply::Hidden {
        step,
        position,
        output,
        dtype: open.dtype,
        draining: server.is_draining(),
        forwarded: None,
    })
}

/// Most positions of a replay's consecutive steps that run as one forward.
const MAX_JOINED_POSITIONS: usize = 512;

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

/// Checks every step against the session before any is computed, and decodes them.
fn validate(
    server: &ShardServer,
    cache: &ShardCache,
    position: u32,
    steps: Vec<WireTensor<'_>>,
) -> Result<Vec<Tensor>, Refusal> {
    if steps.is_empty() {
        return Err((ErrorKind::BadRequest, "no hidden states to process".into()));
    }
    if position as usize > cache.len() {
        let msg = format!(
            "step at position {position}, but the session has {} positions",
            cache.len()
        );
        return Err((ErrorKind::BadRequest, msg));
    }
    let hidden_size = server.shard.config().hidden_size;
    let max_step = server.limits.max_step_positions;
    let mut total = 0usize;
    let mut inputs = Vec::with_capacity(steps.len());
    for step in steps {
        // One sequence per session: clients batch by opening sessions, which the KV
        // budget, the session limits and the compute queue all count.
        let seq = match step.shape.as_slice() {
            &[1, s, h] if s > 0 && h as usize == hidden_size => s as usize,
            shape => {
                let msg =
                    format!("hidden states have shape {shape:?}; expected [1, seq, {hidden_size}]");
                return Err((ErrorKind::BadTensor, msg));
            }
        };
        if seq > max_step {
            let msg =
                format!("a step of {seq} positions exceeds this server's limit of {max_step}");
            return Err((ErrorKind::TooLong, msg));
        }
        total = total.saturating_add(seq);
        if position as usize + total > cache.max_len() {
            let msg = format!(
                "{total} more positions would exceed the session's maximum of {}",
                cache.max_len()
            );
            return Err((ErrorKind::TooLong, msg));
        }
        // The values were decoded from the frame; they move into the tensor uncopied.
        let values = step
            .to_f32()
            .map_err(|e| (ErrorKind::BadTensor, e.to_string()))?;
        let tensor = Tensor::from_vec(values, (1, seq, hidden_size), &Device::Cpu)
            .map_err(|e| (ErrorKind::BadTensor, e.to_string()))?;
        inputs.push(tensor);
    }
    Ok(inputs)
}

fn forward_error_kind(e: &ForwardError) -> ErrorKind {
    match e {
        ForwardError::ContextFull { .. } => ErrorKind::TooLong,
        ForwardError::Shape { .. } | ForwardError::Batch { .. } => ErrorKind::BadTensor,
        _ => ErrorKind::Internal,
    }
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
