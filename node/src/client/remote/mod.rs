//! A pipeline over remote servers: one inference session per route segment, each on
//! its own long-lived stream. Each segment gets the hidden states of the previous one,
//! so servers only ever see hidden states, never tokens.
//!
//! Servers forward each output to the next server themselves when they can (the
//! protocol's forwarding), so a token crosses the network once per server plus once
//! back instead of twice per server; every output still reaches the client.
//!
//! Every step a segment was sent is kept, so when its server fails the client can
//! route around it and replay the history on the new servers, which rebuilds their
//! caches exactly; the generation continues with the same tokens ([`failover`]).

mod failover;
mod segment;

use std::time::{Duration, Instant};

use allmende_protocol::inference::{ForwardLink, STEP_POSITIONS};
use allmende_protocol::{ErrorKind, LayerRange, WireDType, WireTensor};
use candle_core::{Device, Tensor};
use libp2p::PeerId;
use serde::Serialize;

pub use segment::{next_step_id, RouteSegment, SegmentSession, STEP_TIMEOUT};

use super::connect::ModelTarget;
use super::pipeline::{Pipeline, PipelineError};
use crate::network::Network;
use crate::routing::{BanList, RouteError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    #[error("server {peer} (layers {range}) is busy: {reason}")]
    Busy {
        peer: PeerId,
        range: LayerRange,
        reason: String,
    },
    #[error("server {peer} (layers {range}) refused: {message} ({kind:?})")]
    Refused {
        peer: PeerId,
        range: LayerRange,
        kind: ErrorKind,
        message: String,
    },
    #[error("lost server {peer} (layers {range}): {reason}")]
    Connection {
        peer: PeerId,
        range: LayerRange,
        reason: String,
    },
    #[error("server {peer} (layers {range}) did not answer within {waited:?}")]
    Silent {
        peer: PeerId,
        range: LayerRange,
        waited: Duration,
    },
    #[error("server {peer} (layers {range}) sent an unexpected reply: {reason}")]
    Protocol {
        peer: PeerId,
        range: LayerRange,
        reason: String,
    },
    #[error("{route} of model {model_name} ({model}) after losing a server: {cause}")]
    NoReplica {
        route: RouteError,
        model_name: String,
        model: String,
        cause: String,
    },
    #[error("cannot convert hidden states: {0}")]
    Tensor(String),
    /// A step's task on the async runtime ended without a result (the runtime is
    /// shutting down); the session's route went with it.
    #[error("the session's route is lost: {0}")]
    Lost(String),
}

impl RemoteError {
    /// A refusal that says the request itself is wrong: every honest server would
    /// refuse it the same way.
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self,
            RemoteError::Refused {
                kind: ErrorKind::BadRequest | ErrorKind::BadTensor | ErrorKind::TooLong,
                ..
            }
        )
    }

    /// The server this error concerns, if any.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            RemoteError::Busy { peer, .. }
            | RemoteError::Refused { peer, .. }
            | RemoteError::Connection { peer, .. }
            | RemoteError::Silent { peer, .. }
            | RemoteError::Protocol { peer, .. } => Some(*peer),
            RemoteError::NoReplica { .. } | RemoteError::Tensor(_) | RemoteError::Lost(_) => None,
        }
    }
}

/// How long a server's output may be awaited, beyond twice what the previous server
/// took, when the previous server said it forwarded the step there: a forwarded step
/// can be lost (a connection between the two servers failing after the hand-over),
/// and then the client sends the step itself rather than wait for a timeout and
/// blame a server that never received it.
const FORWARD_PATIENCE: Duration = Duration::from_secs(2);

/// A segment of the live route, with every step it was sent.
pub struct Segment {
    pub session: SegmentSession,
    pub history: Vec<WireTensor<'static>>,
}

/// Opens a session on every segment of `route`, in order, with empty histories.
async fn open_route(
    context: &RouteContext,
    route: &[RouteSegment],
) -> Result<Vec<Segment>, RemoteError> {
    let mut segments = Vec::with_capacity(route.len());
    for segment in route {
        let session = SegmentSession::open(
            &context.network,
            context.target.id,
            segment.clone(),
            context.max_len,
            context.dtype,
        )
        .await?;
        segments.push(Segment {
            session,
            history: Vec::new(),
        });
    }
    Ok(segments)
}

/// What the pipeline needs to open sessions anywhere in the swarm.
#[derive(Clone)]
pub struct RouteContext {
    pub network: Network,
    pub target: ModelTarget,
    pub max_len: u32,
    pub dtype: WireDType,
    /// How long a failed segment may look for replacement servers before giving up.
    pub failover_patience: Duration,
    /// Servers forward each step's output straight to the next server of the route
    /// (the client still receives every output); otherwise the client relays them.
    pub forward: bool,
}

/// How the inputs of every server after the first reached it.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct HopCounts {
    /// Sent on by the previous server.
    pub forwarded_by_servers: u64,
    /// Sent by the client: forwarding was off, failed, or the server was replaced.
    pub relayed_by_client: u64,
    /// Forwarded, but the output did not come in time, so the client sent it too
    /// (counted in `forwarded_by_servers` as well).
    pub resent_by_client: u64,
}

/// A server the session moved away from, and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverEvent {
    #[serde(serialize_with = "display_peer")]
    pub peer: PeerId,
    pub layers: [u32; 2],
    /// `crash`: a step failed and waited for the new route; `drain`: the server was
    /// leaving and the session moved while it still served; `relay`: the relayed
    /// connection ended (its relay's circuit limit), the server was not blamed, and
    /// the session moved, to the same server where it still answers.
    pub kind: &'static str,
    pub reason: String,
    /// How long generation waited for the move.
    pub stall_ms: f64,
    pub replaced_by: Vec<RouteSegment>,
}

fn display_peer<S: serde::Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(peer)
}

pub struct RemotePipeline {
    runtime: tokio::runtime::Handle,
    /// Moves into each step's task and back; `None` only if a step's task was lost.
    route: Option<Route>,
}

/// The session's live route and what it has been through.
struct Route {
    context: RouteContext,
    segments: Vec<Segment>,
    bans: BanList<PeerId>,
    events: Vec<FailoverEvent>,
    migration: Option<failover::Migration>,
    hops: HopCounts,
}

impl RemotePipeline {
    /// Opens one session per segment of `route`, in order.
    pub async fn open(context: RouteContext, route: &[RouteSegment]) -> Result<Self, RemoteError> {
        let segments = open_route(&context, route).await?;
        Ok(Self {
            runtime: tokio::runtime::Handle::current(),
            route: Some(Route {
                context,
                segments,
                bans: BanList::default(),
                events: Vec::new(),
                migration: None,
                hops: HopCounts::default(),
            }),
        })
    }

    pub fn route(&self) -> Vec<RouteSegment> {
        self.route
            .iter()
            .flat_map(|r| &r.segments)
            .map(|s| s.session.segment.clone())
            .collect()
    }

    /// For each segment of [`Self::route`], the link its server last said it handed
    /// outputs on over, to the next segment's server.
    pub fn forward_links(&self) -> Vec<Option<ForwardLink>> {
        self.route
            .iter()
            .flat_map(|r| &r.segments)
            .map(|s| s.session.forward_link)
            .collect()
    }

    /// Servers this session moved away from.
    pub fn failovers(&self) -> &[FailoverEvent] {
        self.route.as_ref().map_or(&[], |r| &r.events)
    }

    /// How the servers' inputs travelled.
    pub fn hops(&self) -> HopCounts {
        self.route
            .as_ref()
            .map_or_else(HopCounts::default, |r| r.hops)
    }

    /// Closes every session so servers free their caches at once.
    pub async fn close(self) {
        if let Some(route) = self.route {
            route.close().await;
        }
    }
}

impl Route {
    async fn forward_async(&mut self, hidden: &Tensor) -> Result<Tensor, RemoteError> {
        self.finish_migration().await;
        let dims: Vec<u32> = hidden.dims().iter().map(|&d| d as u32).collect();
        let tensor_err = |e: &dyn std::fmt::Display| RemoteError::Tensor(e.to_string());
        // The one copy the client keeps: each segment's inputs stay in its history,
        // for replay on a replacement server. Steps are encoded from them in place.
        let values = hidden
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| tensor_err(&e))?;
        let mut wire =
            WireTensor::from_vec(&dims, values, self.context.dtype).map_err(|e| tensor_err(&e))?;
        let seq = dims.get(1).copied().unwrap_or(0);
        // This attempt at the step; a new one after each failover, so servers past
        // the failed one replace what the lost attempt may have left there.
        let mut step = next_step_id();
        // Whether segment `i` has its input: sent by this client, or forwarded to it
        // by the previous server.
        let mut has_input = false;
        // A request every server refuses must not cost the session all its replicas:
        // after one replacement refused it too, the refusal is the answer.
        let mut refusals = 0;
        // When segment `i`'s input left: the client's send, or the arrival of the
        // previous segment's output (sent on by its server). Decode steps through a
        // segment are timed from it, for routing by measured speed.
        let mut since = Instant::now();
        // How long the previous segment took: what a forwarded step's wait scales with.
        let mut previous = Duration::ZERO;
        let mut i = 0;
        while i < self.segments.len() {
            if i > 0 {
                match has_input {
                    true => self.hops.forwarded_by_servers += 1,
                    false => self.hops.relayed_by_client += 1,
                }
            }
            let output = match has_input {
                true => {
                    let patience = FORWARD_PATIENCE + 2 * previous;
                    let waited = self.segments[i].session.output_within(seq, step, patience);
                    match waited.await {
                        Ok(Some(output)) => Ok(output),
                        Ok(None) => {
                            tracing::debug!(
                                "no forwarded output within {patience:?}; sending the step"
                            );
                            self.hops.resent_by_client += 1;
                            self.send(i, step, &wire).await
                        }
                        Err(e) => Err(e),
                    }
                }
                false => {
                    since = Instant::now();
                    self.send(i, step, &wire).await
                }
            };
            match output {
                Ok((output, forwarded)) if output.shape == dims => {
                    if seq == 1 {
                        let segment = &self.segments[i].session.segment;
                        let elapsed_ms = since.elapsed().as_secs_f64() * 1e3;
                        crate::client::connect::measured().record(
                            &segment.peer,
                            segment.range.len(),
                            elapsed_ms,
                        );
                    }
                    previous = since.elapsed();
                    since = Instant::now();
                    self.segments[i].history.push(wire);
                    wire = output;
                    has_input = forwarded;
                    i += 1;
                }
                Ok((output, _)) => {
                    let segment = &self.segments[i].session.segment;
                    let reason = format!("returned shape {:?} for input {dims:?}", output.shape);
                    let error = RemoteError::Protocol {
                        peer: segment.peer,
                        range: segment.range,
                        reason,
                    };
                    self.fail_over(i, error, &mut refusals).await?;
                    has_input = false;
                    step = next_step_id();
                }
                Err(e) => {
                    self.fail_over(i, e, &mut refusals).await?;
                    has_input = false;
                    step = next_step_id();
                }
            }
        }
        self.start_migration();
        let values = wire.to_f32().map_err(|e| tensor_err(&e))?;
        let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).map_err(|e| tensor_err(&e))
    }

    /// Sends step `step` to segment `i` (naming the servers after it, if they forward)
    /// and waits for its output.
    async fn send(
        &mut self,
        i: usize,
        step: u64,
        wire: &WireTensor<'static>,
    ) -> Result<(WireTensor<'static>, bool), RemoteError> {
        let forward = match self.context.forward {
            true => self.segments[i..]
                .windows(2)
                .map(|pair| {
                    let (from, to) = (&pair[0].session, &pair[1].session);
                    to.hop(&from.segment.peer, step, from.forward_link.is_none())
                })
                .collect(),
            false => Vec::new(),
        };
        let seq = wire.shape.get(1).copied().unwrap_or(0);
        let session = &mut self.segments[i].session;
        session.send_step(step, wire.view(), forward).await?;
        session.output(seq, step).await
    }

    /// Replaces segment `i`, whose server just failed, and records the stall; unless
    /// the failure is a second refusal of the request itself (`refusals` counts them).
    async fn fail_over(
        &mut self,
        i: usize,
        error: RemoteError,
        refusals: &mut u32,
    ) -> Result<(), RemoteError> {
        if error.is_deterministic() {
            *refusals += 1;
            if *refusals > 1 {
                return Err(error);
            }
        }
        let started = Instant::now();
        let failed = self.segments.remove(i);
        let (peer, range) = (failed.session.segment.peer, failed.session.segment.range);
        self.bans.prune(started);
        // A relayed stream may end with its relay's circuit while the server is
        // fine: a planned move, which may reconnect to the same server. A server
        // that did fail does not answer discovery's probe, so it is passed over
        // without a ban.
        let circuit_ended = failed.session.relayed && !error.is_deterministic();
        match circuit_ended {
            true => tracing::info!("{error}: the relayed connection ended; moving layers {range}"),
            false => {
                tracing::warn!("{error}; rerouting layers {range}");
                self.bans.ban(&peer, started);
            }
        }
        let (replacement, outputs) = failover::reroute(
            &self.context,
            &mut self.bans,
            range,
            &failed.history,
            &error,
        )
        .await?;
        let replaced_by = replacement
            .iter()
            .map(|s| s.session.segment.clone())
            .collect();
        let next = i + replacement.len();
        self.segments.splice(i..i, replacement);
        // The servers after the failed one computed what it sent them. Honest servers
        // agree bit for bit, so the replacement's outputs equal those; where they do
        // not, the failed server sent wrong ones, and every later server starts over
        // from the replacement's.
        if self
            .segments
            .get(next)
            .is_some_and(|s| s.history != outputs)
        {
            tracing::warn!(
                "server {peer} (layers {range}) had sent outputs its replacement does not \
                 reproduce; rebuilding the route's later servers"
            );
            failover::restart_chain(&mut self.segments[next..], outputs).await?;
        }
        self.events.push(FailoverEvent {
            peer,
            layers: [range.start, range.end],
            kind: if circuit_ended { "relay" } else { "crash" },
            reason: error.to_string(),
            stall_ms: started.elapsed().as_secs_f64() * 1e3,
            replaced_by,
        });
        Ok(())
    }

    async fn close(mut self) {
        if let Some(m) = self.migration.take() {
            m.abort();
        }
        for segment in self.segments {
            segment.session.close().await;
        }
    }
}

impl Pipeline for RemotePipeline {
    /// Must be called from a thread outside the async runtime (e.g. `spawn_blocking`).
    ///
    /// The step runs as a task on the runtime, beside the tasks of the connections:
    /// each server's reply wakes it on the thread that read the reply, and this thread
    /// is woken once per step instead of twice per server (each a wake-up of a
    /// sleeping thread, tens of microseconds on an idle core).
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor, PipelineError> {
        // Every server accepts steps of `STEP_POSITIONS`; a longer prefill goes in
        // steps of that size, with the same results bit for bit (`tests/batching.rs`).
        let seq = hidden
            .dim(1)
            .map_err(|e| RemoteError::Tensor(e.to_string()))?;
        if seq > STEP_POSITIONS {
            let mut outputs = Vec::with_capacity(seq.div_ceil(STEP_POSITIONS));
            for start in (0..seq).step_by(STEP_POSITIONS) {
                let chunk = hidden
                    .narrow(1, start, STEP_POSITIONS.min(seq - start))
                    .map_err(|e| RemoteError::Tensor(e.to_string()))?;
                outputs.push(self.forward_step(&chunk)?);
            }
            return Ok(Tensor::cat(&outputs, 1).map_err(|e| RemoteError::Tensor(e.to_string()))?);
        }
        self.forward_step(hidden)
    }
}

impl RemotePipeline {
    /// Runs one step of at most `STEP_POSITIONS` positions through the route.
    fn forward_step(&mut self, hidden: &Tensor) -> Result<Tensor, PipelineError> {
        let mut route = self
            .route
            .take()
            .ok_or_else(|| RemoteError::Lost("an earlier step did not come back".into()))?;
        let hidden = hidden.clone();
        let step = self.runtime.spawn(async move {
            let result = route.forward_async(&hidden).await;
            (route, result)
        });
        match self.runtime.block_on(step) {
            Ok((route, result)) => {
                self.route = Some(route);
                Ok(result?)
            }
            Err(e) => Err(RemoteError::Lost(e.to_string()).into()),
        }
    }
}
