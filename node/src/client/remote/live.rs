//! The session's live route: runs each step through its segments, and replaces a
//! server
//!
//! - that fails: at once, replaying the segment's history on new servers
//!   ([`super::failover`]) before the step goes on;
//! - that is leaving (draining): it keeps serving while the history is replayed on its
//!   replacement in the background ([`Migration`]); the steps sent in the meantime are
//!   caught up, and the session switches over within one step.

use std::time::{Duration, Instant};

use allmende_protocol::{LayerRange, WireTensor};
use candle_core::{Device, Tensor};
use libp2p::PeerId;
use tokio::task::JoinHandle;

use super::error::RemoteError;
use super::failover::{replay_chain, reroute, restart_chain};
use super::route::{open_route, FailoverEvent, HopCounts, RouteContext, Segment};
use super::segment::next_step_id;
use crate::client::routes::{measured, RouteSegment};
use crate::routing::BanList;

/// How long a server's output may be awaited, beyond twice what the previous server
/// took, when the previous server said it forwarded the step there: a forwarded step
/// can be lost (a connection between the two servers failing after the hand-over),
/// and then the client sends the step itself rather than wait for a timeout and
/// blame a server that never received it.
const FORWARD_PATIENCE: Duration = Duration::from_secs(2);

/// Steps a finished migration may still have to catch up inside a generation step;
/// more than this are caught up in the background first.
const INLINE_CATCH_UP: usize = 1;

/// The session's live route and what it has been through.
pub(super) struct LiveRoute {
    context: RouteContext,
    segments: Vec<Segment>,
    bans: BanList<PeerId>,
    events: Vec<FailoverEvent>,
    migration: Option<Migration>,
    hops: HopCounts,
}

impl LiveRoute {
    /// Opens one session per segment of `route`, in order.
    pub(super) async fn open(
        context: RouteContext,
        route: &[RouteSegment],
    ) -> Result<Self, RemoteError> {
        let segments = open_route(&context, route).await?;
        Ok(Self {
            context,
            segments,
            bans: BanList::default(),
            events: Vec::new(),
            migration: None,
            hops: HopCounts::default(),
        })
    }

    pub(super) fn network(&self) -> &crate::network::Network {
        &self.context.network
    }

    pub(super) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub(super) fn events(&self) -> &[FailoverEvent] {
        &self.events
    }

    pub(super) fn hops(&self) -> HopCounts {
        self.hops
    }

    pub(super) async fn forward_async(&mut self, hidden: &Tensor) -> Result<Tensor, RemoteError> {
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
                        measured().record(&segment.peer, segment.range.len(), elapsed_ms);
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
        let (replacement, outputs) = reroute(
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
            restart_chain(&mut self.segments[next..], outputs).await?;
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

    pub(super) async fn close(mut self) {
        if let Some(m) = self.migration.take() {
            m.abort();
        }
        for segment in self.segments {
            segment.session.close().await;
        }
    }
}

/// A draining segment being moved in the background.
pub struct Migration {
    peer: PeerId,
    range: LayerRange,
    reason: String,
    task: JoinHandle<Result<(Vec<Segment>, usize), RemoteError>>,
}

impl Migration {
    pub fn abort(self) {
        self.task.abort();
    }
}

impl LiveRoute {
    /// Starts moving the first draining segment, if any and none is moving yet.
    pub(super) fn start_migration(&mut self) {
        if self.migration.is_some() {
            return;
        }
        let Some(segment) = self.segments.iter().find(|s| s.session.draining) else {
            return;
        };
        let (peer, range) = (segment.session.segment.peer, segment.session.segment.range);
        let history = segment.history.clone();
        let covered = history.len();
        let context = self.context.clone();
        let mut bans = BanList::default();
        bans.ban(&peer, Instant::now());
        let reason = format!("server {peer} (layers {range}) is shutting down");
        tracing::info!("{reason}; moving its session");
        let cause = RemoteError::Refused {
            peer,
            range,
            kind: allmende_protocol::ErrorKind::ShuttingDown,
            message: reason.clone(),
        };
        let task = tokio::spawn(async move {
            let (segments, _) = reroute(&context, &mut bans, range, &history, &cause).await?;
            Ok((segments, covered))
        });
        self.migration = Some(Migration {
            peer,
            range,
            reason,
            task,
        });
    }

    /// Switches to a finished migration's segments, catching up the steps sent since
    /// it started. A large catch-up goes to the background again first.
    pub(super) async fn finish_migration(&mut self) {
        let Some(migration) = self.migration.take_if(|m| m.task.is_finished()) else {
            return;
        };
        let started = Instant::now();
        let Some(index) = self.segments.iter().position(|s| {
            s.session.segment.peer == migration.peer && s.session.segment.range == migration.range
        }) else {
            // The segment failed and was rerouted meanwhile; nothing to switch.
            return;
        };
        let (mut segments, covered) = match migration.task.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                tracing::warn!("could not move the session off a draining server: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!("session move stopped: {e}");
                return;
            }
        };
        let pending = self.segments[index].history[covered..].to_vec();
        if pending.len() > INLINE_CATCH_UP {
            let total = self.segments[index].history.len();
            let task = tokio::spawn(async move {
                replay_chain(&mut segments, pending).await?;
                Ok((segments, total))
            });
            self.migration = Some(Migration { task, ..migration });
            return;
        }
        if let Err(e) = replay_chain(&mut segments, pending).await {
            tracing::warn!("could not catch up the moved session: {e}");
            return;
        }
        let replaced_by = segments.iter().map(|s| s.session.segment.clone()).collect();
        let old: Vec<Segment> = self.segments.splice(index..=index, segments).collect();
        for segment in old {
            segment.session.close().await;
        }
        self.events.push(FailoverEvent {
            peer: migration.peer,
            layers: [migration.range.start, migration.range.end],
            kind: "drain",
            reason: migration.reason,
            stall_ms: started.elapsed().as_secs_f64() * 1e3,
            replaced_by,
        });
    }
}
