//! Turning a swarm into a pipeline: find a route over the model's servers, open a
//! session on every segment. A busy or unreachable server is left out and the route
//! found again, until the servers run out or the deadline passes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use allmende_protocol::WireDType;
use libp2p::PeerId;

pub use super::routes::ModelTarget;

use super::remote::{RemoteError, RemotePipeline, RouteContext};
use super::routes::RouteFinder;
use crate::network::Network;
use crate::routing::RouteError;

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

/// How long to wait before asking the swarm again while the servers found do not
/// cover the model.
const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// Opens a pipeline over the swarm for a session of `max_len` positions.
pub async fn connect(
    network: &Network,
    target: &ModelTarget,
    max_len: u32,
    options: RouteOptions,
) -> Result<RemotePipeline, ConnectError> {
    let started = Instant::now();
    let mut deadline = started + DISCOVERY_PATIENCE;
    let mut finder = RouteFinder::new(network, target, LOOK_AGAIN);
    let mut excluded: HashSet<PeerId> = HashSet::new();
    // Servers that said they were busy, and until when they are left out.
    let mut busy: HashMap<PeerId, Instant> = HashMap::new();
    let mut failures: Vec<String> = Vec::new();
    let context = RouteContext {
        network: network.clone(),
        target: target.clone(),
        max_len,
        dtype: options.dtype,
        failover_patience: options.failover_patience,
        forward: options.forward,
    };
    loop {
        let exclude = |peer: &PeerId, now: Instant| {
            excluded.contains(peer) || busy.get(peer).is_some_and(|until| now < *until)
        };
        let segments = match finder
            .find_route(target.all_layers(), exclude, deadline)
            .await
        {
            Ok(segments) => segments,
            Err(route) => {
                let mut unusable = finder.notes().to_vec();
                unusable.append(&mut failures);
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
        };
        match RemotePipeline::open(context.clone(), &segments).await {
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
                failures.push(e.to_string());
            }
        }
    }
}
