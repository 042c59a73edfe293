//! Turning a swarm into a pipeline: discover the model's servers, plan a route, open a
//! session on every segment. A busy or unreachable server is left out and the route
//! planned again, until the servers run out or the deadline passes.

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use allmende_protocol::inference::PROTOCOL_VERSION;
use allmende_protocol::{ModelId, WireDType};
use libp2p::PeerId;

use super::remote::{RemoteError, RemotePipeline, RouteContext, RouteSegment};
use crate::network::discovery::{discover, DiscoveredServer};
use crate::network::Network;
use crate::routing::{plan_route, Candidate, Measured, RouteError};

/// How long to keep looking for servers before reporting what is missing: the DHT of
/// a swarm that was just joined may need a moment to answer.
pub const DISCOVERY_PATIENCE: Duration = Duration::from_secs(5);
/// How long to wait for a session when the servers that could serve one are busy:
/// sessions end every few seconds on a loaded swarm, so a client waits its turn as a
/// busy web server's clients do, rather than failing at once.
pub const BUSY_PATIENCE: Duration = Duration::from_secs(30);
/// How long a server that said it is busy is left out before it is asked again.
const BUSY_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("{route} of model {model_name} ({model}){}", unusable_note(.unusable))]
    NoRoute {
        route: RouteError,
        model_name: String,
        model: String,
        /// Servers that were found but could not take the session, and why.
        unusable: Vec<String>,
    },
}

fn unusable_note(unusable: &[String]) -> String {
    match unusable.is_empty() {
        true => String::new(),
        false => format!("; unusable servers: {}", unusable.join("; ")),
    }
}

/// What the client knows of the model it wants served.
#[derive(Clone, Debug)]
pub struct ModelTarget {
    pub id: ModelId,
    pub name: String,
    pub block_count: u32,
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
        })
        .collect()
}

/// How a session's route carries its steps.
#[derive(Clone, Copy, Debug)]
pub struct RouteOptions {
    /// Element type of hidden states on the wire.
    pub dtype: WireDType,
    /// How long a failed server's layers may look for other servers.
    pub failover_patience: Duration,
    /// Servers forward each output straight to the next server (the default);
    /// `false`: the client relays every output itself.
    pub forward: bool,
}

impl RouteOptions {
    pub fn new(dtype: WireDType, failover_patience: Duration) -> Self {
        Self {
            dtype,
            failover_patience,
            forward: true,
        }
    }
}

/// Opens a pipeline over the swarm for a session of `max_len` positions.
pub async fn connect(
    network: &Network,
    target: &ModelTarget,
    max_len: u32,
    options: RouteOptions,
) -> Result<RemotePipeline, ConnectError> {
    let started = Instant::now();
    let mut deadline = started + DISCOVERY_PATIENCE;
    let mut excluded: HashSet<PeerId> = HashSet::new();
    // Servers that said they were busy, and until when they are left out.
    let mut busy: HashMap<PeerId, Instant> = HashMap::new();
    let mut unusable: Vec<String> = Vec::new();
    loop {
        let now = Instant::now();
        let mut servers: Vec<DiscoveredServer> = discover(network, &target.id, true).await;
        for server in &servers {
            let Some(theirs) = server.other_version() else {
                continue;
            };
            if excluded.insert(server.peer) {
                let note = format!(
                    "server {} speaks inference protocol {theirs}, this node {PROTOCOL_VERSION} \
                     (one of the two runs another version of allmende)",
                    server.peer
                );
                tracing::warn!("{note}");
                unusable.push(note);
            }
        }
        servers.retain(|s| s.usable());
        let servers: Vec<DiscoveredServer> = servers
            .into_iter()
            .filter(|s| !excluded.contains(&s.peer))
            .filter(|s| busy.get(&s.peer).is_none_or(|until| *until <= now))
            .collect();
        let candidates = candidates(&servers);
        let route = match plan_route(&candidates, target.block_count) {
            Ok(route) => route,
            Err(route) if Instant::now() >= deadline => {
                if !busy.is_empty() {
                    unusable.push(format!(
                        "{} server(s) stayed busy for {} s",
                        busy.len(),
                        BUSY_PATIENCE.as_secs()
                    ));
                }
                return Err(ConnectError::NoRoute {
                    route,
                    model_name: target.name.clone(),
                    model: target.id.short(),
                    unusable,
                });
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let segments: Vec<RouteSegment> = route
            .iter()
            .map(|hop| RouteSegment {
                peer: candidates[hop.server].peer,
                range: hop.range,
            })
            .collect();
        let context = RouteContext {
            network: network.clone(),
            target: target.clone(),
            max_len,
            dtype: options.dtype,
            failover_patience: options.failover_patience,
            forward: options.forward,
        };
        match RemotePipeline::open(context, &segments).await {
            Ok(pipeline) => return Ok(pipeline),
            Err(RemoteError::Busy { peer, .. }) => {
                tracing::debug!(%peer, "busy; waiting for a session to free up");
                busy.insert(peer, Instant::now() + BUSY_BACKOFF);
                deadline = deadline.max(started + BUSY_PATIENCE);
            }
            Err(e) => {
                tracing::info!("route {segments:?} failed: {e}; trying without that server");
                if let Some(peer) = e.peer() {
                    excluded.insert(peer);
                }
                unusable.push(e.to_string());
            }
        }
    }
}
