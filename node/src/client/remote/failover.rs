//! Moving a session's segment to other servers ([`reroute`]): the failed or leaving
//! server is banned, a route over just its layers is found among the others, and the
//! segment's whole history is replayed there. Replays repeat the original steps one
//! by one, so the new caches, and so all later tokens, are bit-identical to an
//! undisturbed run.

use std::time::{Duration, Instant};

use allmende_protocol::{LayerRange, WireTensor};
use libp2p::PeerId;

use super::error::RemoteError;
use super::route::{open_route, RouteContext, Segment};
use crate::client::routes::{RouteFinder, RouteSegment};
use crate::routing::BanList;

/// The new segments, and the outputs of the last one for the history replayed.
type Rebuilt = (Vec<Segment>, Vec<WireTensor<'static>>);

/// How long to wait before asking the swarm again while no server covers the layers.
const LOOK_AGAIN: Duration = Duration::from_millis(500);

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
    let mut finder = RouteFinder::new(&context.network, &context.target, LOOK_AGAIN);
    loop {
        let exclude = |peer: &PeerId, now: Instant| bans.is_banned(peer, now);
        let route = finder
            .find_route(range, exclude, deadline)
            .await
            .map_err(|route| RemoteError::NoReplica {
                route,
                model_name: context.target.name.clone(),
                model: context.target.id.short(),
                cause: cause.to_string(),
            })?;
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
pub async fn replay_chain(
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
