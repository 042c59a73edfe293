//! Moving a session's segment to other servers.
//!
//! - After a failure ([`reroute`]): the failed server is banned, a route over just its
//!   layers is planned among the others, and the segment's whole history is replayed
//!   there. Replays repeat the original steps one by one, so the new caches, and so all
//!   later tokens, are bit-identical to an undisturbed run.
//! - Before a failure ([`Migration`]): a draining server keeps serving while the
//!   history is replayed on its replacement in the background; the steps sent in the
//!   meantime are caught up, and the session switches over within one step.

use std::time::{Duration, Instant};

use allmende_protocol::{LayerRange, WireTensor};
use libp2p::PeerId;
use tokio::task::JoinHandle;

use super::{open_route, FailoverEvent, RemoteError, Route, RouteContext, RouteSegment, Segment};
use crate::client::connect::candidates;
use crate::network::discovery::discover;
use crate::routing::{plan_route_over, BanList};

/// Steps a finished migration may still have to catch up inside a generation step;
/// more than this are caught up in the background first.
const INLINE_CATCH_UP: usize = 1;

/// The new segments, and the outputs of the last one for the history replayed.
type Rebuilt = (Vec<Segment>, Vec<WireTensor<'static>>);

/// Finds servers for `range` (avoiding banned ones), opens sessions and replays
/// `history` through them. Retries with other servers until the context's failover
/// patience runs out.
pub async fn reroute(
    context: &RouteContext,
    bans: &mut BanList<PeerId>,
    range: LayerRange,
    history: &[WireTensor<'static>],
    cause: &RemoteError,
) -> Result<Rebuilt, RemoteError> {
    let deadline = Instant::now() + context.failover_patience;
    loop {
        let now = Instant::now();
        let servers: Vec<_> = discover(&context.network, &context.target.id, true)
            .await
            .into_iter()
            .filter(|s| s.usable() && !bans.is_banned(&s.peer, now))
            .collect();
        tracing::debug!("failover: discovery took {:?}", now.elapsed());
        let candidates = candidates(&servers);
        let hops = match plan_route_over(&candidates, range) {
            Ok(hops) => hops,
            Err(route) if Instant::now() >= deadline => {
                return Err(RemoteError::NoReplica {
                    route,
                    model_name: context.target.name.clone(),
                    model: context.target.id.short(),
                    cause: cause.to_string(),
                })
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let route: Vec<RouteSegment> = hops
            .iter()
            .map(|h| RouteSegment {
                peer: candidates[h.server].peer,
                range: h.range,
            })
            .collect();
        let started = Instant::now();
        match rebuild(context, &route, history).await {
            Ok(rebuilt) => {
                tracing::debug!(
                    "failover: rebuilt {} steps in {:?}",
                    history.len(),
                    started.elapsed()
                );
                return Ok(rebuilt);
            }
            Err(e) => {
                tracing::warn!("replacement route failed: {e}");
                if let Some(peer) = e.peer() {
                    bans.ban(&peer, Instant::now());
                }
            }
        }
    }
}

/// Opens sessions along `route` and replays `history` through them.
async fn rebuild(
    context: &RouteContext,
    route: &[RouteSegment],
    history: &[WireTensor<'static>],
) -> Result<Rebuilt, RemoteError> {
    let mut segments = open_route(context, route).await?;
    let outputs = replay_chain(&mut segments, history.to_vec()).await?;
    Ok((segments, outputs))
}

/// Replays `steps` through a chain of segments: each one's outputs are the next one's
/// inputs, and each one's history grows by what it was sent. Returns the last one's
/// outputs.
async fn replay_chain(
    segments: &mut [Segment],
    mut steps: Vec<WireTensor<'static>>,
) -> Result<Vec<WireTensor<'static>>, RemoteError> {
    if steps.is_empty() {
        return Ok(steps);
    }
    for segment in segments.iter_mut() {
        let outputs = segment.session.replay(&steps).await?;
        segment.history.extend(steps);
        steps = outputs;
    }
    Ok(steps)
}

/// Runs a chain of open segments again from their first position on new inputs
/// `steps`, replacing everything they held.
pub async fn restart_chain(
    segments: &mut [Segment],
    steps: Vec<WireTensor<'static>>,
) -> Result<(), RemoteError> {
    for segment in segments.iter_mut() {
        segment.session.restart();
        segment.history.clear();
    }
    replay_chain(segments, steps).await.map(drop)
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

impl Route {
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
