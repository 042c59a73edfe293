//! The parts a live route is made of: its segments with their histories, what it
//! needs to open sessions anywhere in the swarm, and the record of what it went
//! through.

use std::time::Duration;

use allmende_protocol::inference::ForwardLink;
use allmende_protocol::{WireDType, WireTensor};
use libp2p::PeerId;
use serde::Serialize;

use super::error::RemoteError;
use super::segment::SegmentSession;
use crate::client::routes::{display_peer, ModelTarget, RouteSegment};
use crate::network::{Network, PathInfo};

/// A segment of the live route, with every step it was sent.
pub struct Segment {
    pub session: SegmentSession,
    pub history: Vec<WireTensor<'static>>,
}

/// Opens a session on every segment of `route`, in order, with empty histories.
pub(super) async fn open_route(
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

/// A swarm session's route as it stands, and what it went through.
#[derive(Clone, Debug)]
pub struct SwarmRoute {
    pub segments: Vec<RouteSegment>,
    /// The path to each segment's server, when this client holds a connection to it.
    pub paths: Vec<Option<PathInfo>>,
    /// The link each segment's server handed outputs on over to the next one's.
    pub forward_links: Vec<Option<ForwardLink>>,
    pub failovers: Vec<FailoverEvent>,
    pub hops: HopCounts,
}
