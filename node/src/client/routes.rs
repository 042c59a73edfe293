//! Finding servers for a range of layers, for a new session and for a failed server's
//! layers alike: discover the model's servers, leave out the ones to avoid, plan the
//! cheapest route, and look again until the deadline.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use allmende_protocol::inference::PROTOCOL_VERSION;
use allmende_protocol::{LayerRange, ModelId, NUMERICS_VERSION};
use libp2p::PeerId;
use serde::Serialize;

use crate::network::discovery::{discover, DiscoveredServer};
use crate::network::Network;
use crate::routing::{plan_route_preferring, Candidate, Measured, PreferredRoute, RouteError};

/// What the client knows of the model it wants served.
#[derive(Clone, Debug)]
pub struct ModelTarget {
    pub id: ModelId,
    pub name: String,
    pub block_count: u32,
}

impl ModelTarget {
    /// Every layer of the model.
    pub fn all_layers(&self) -> LayerRange {
        LayerRange::new(0, self.block_count)
    }
}

/// One segment of a route: a server and the layers it runs for this session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteSegment {
    #[serde(serialize_with = "display_peer")]
    pub peer: PeerId,
    pub range: LayerRange,
    /// The numerics version the server announced.
    pub numerics_version: u32,
}

/// Peers are written as their text form in reports.
pub fn display_peer<S: serde::Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(peer)
}

/// What this process has measured of the servers its sessions used, shared by all
/// its sessions (a gateway's many users teach each other's routes).
pub fn measured() -> std::sync::MutexGuard<'static, Measured<PeerId>> {
    static MEASURED: LazyLock<Mutex<Measured<PeerId>>> = LazyLock::new(Mutex::default);
    MEASURED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The servers as the router sees them: at the speed this process measured, or at
/// their announced speed held to what is plausible (`routing::Measured`).
pub fn candidates(servers: &[DiscoveredServer]) -> Vec<Candidate<PeerId>> {
    let claims: Vec<(PeerId, u32, f64)> = servers
        .iter()
        .map(|s| (s.peer, s.info.range.len(), s.info.throughput as f64))
        .collect();
    let throughputs = measured().routing_throughputs(&claims);
    servers
        .iter()
        .zip(throughputs)
        .map(|(s, throughput)| Candidate {
            peer: s.peer,
            range: s.info.range,
            throughput,
            rtt_ms: s.rtt_ms,
            free_sessions: s.info.free_sessions,
            numerics: s.info.numerics_version,
        })
        .collect()
}

/// Looks for routes over one model's servers. It remembers the servers that speak
/// another protocol version, to name them to the user when no route is found.
pub struct RouteFinder<'a> {
    network: &'a Network,
    target: &'a ModelTarget,
    /// How long to wait before asking the swarm again when the servers found do not
    /// cover the range.
    look_again: Duration,
    other_versions: HashSet<PeerId>,
    notes: Vec<String>,
}

impl<'a> RouteFinder<'a> {
    pub fn new(network: &'a Network, target: &'a ModelTarget, look_again: Duration) -> Self {
        Self {
            network,
            target,
            look_again,
            other_versions: HashSet::new(),
            notes: Vec::new(),
        }
    }

    /// The cheapest route over `range` among the servers `exclude` does not rule out
    /// (at the moment given), asking the swarm again until one is found or `deadline`
    /// passes; then the last planning error.
    pub async fn find_route(
        &mut self,
        range: LayerRange,
        exclude: impl Fn(&PeerId, Instant) -> bool,
        deadline: Instant,
    ) -> Result<Vec<RouteSegment>, RouteError> {
        loop {
            let started = Instant::now();
            let mut servers = discover(self.network, &self.target.id, true).await;
            tracing::debug!("discovery took {:?}", started.elapsed());
            self.note_other_versions(&servers);
            servers.retain(|s| s.usable() && !exclude(&s.peer, started));
            let candidates = candidates(&servers);
            match plan_route_preferring(&candidates, range, NUMERICS_VERSION) {
                Ok(route) => {
                    note_other_numerics(&route, range);
                    return Ok(route
                        .hops
                        .iter()
                        .map(|hop| RouteSegment {
                            peer: candidates[hop.server].peer,
                            range: hop.range,
                            numerics_version: candidates[hop.server].numerics,
                        })
                        .collect());
                }
                Err(route) if Instant::now() >= deadline => return Err(route),
                Err(_) => tokio::time::sleep(self.look_again).await,
            }
        }
    }

    /// Servers found that speak another protocol version, one sentence each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    fn note_other_versions(&mut self, servers: &[DiscoveredServer]) {
        for server in servers {
            let Some(theirs) = server.other_version() else {
                continue;
            };
            if self.other_versions.insert(server.peer) {
                let note = format!(
                    "server {} speaks inference protocol {theirs}, this node {PROTOCOL_VERSION} \
                     (one of the two runs another version of allmende)",
                    server.peer
                );
                tracing::warn!("{note}");
                self.notes.push(note);
            }
        }
    }
}

/// Says once per process that a route runs layers on servers of another numerics
/// version, whose outputs may differ from this release's in their low bits: a gateway
/// would otherwise repeat it for every session.
fn note_other_numerics(route: &PreferredRoute, range: LayerRange) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if route.other_numerics == 0 {
        return;
    }
    let hops = route.other_numerics;
    if SAID.swap(true, Ordering::Relaxed) {
        tracing::debug!("route over {range}: {hops} hop(s) of another numerics version");
    } else {
        tracing::warn!(
            "servers of this node's numerics version {NUMERICS_VERSION} do not cover layers \
             {range}; the route uses {hops} hop(s) of another version, whose results may \
             differ in their low bits"
        );
    }
}
