//! Finding a model's servers: providers from the DHT, each one's announcement record,
//! then a direct `Info` probe that measures the round trip and reads the current load.

use std::time::{Duration, Instant};

use allmende_protocol::inference::PROTOCOL_VERSION;
use allmende_protocol::{ClientMessage, ModelId, ServerInfo, ServerMessage};
use futures::future::join_all;
use libp2p::{Multiaddr, PeerId};

use super::framing::{read_message, write_message};
use super::keys::{model_key, server_key};
use super::{Network, PathInfo};

/// How long a probe may take before the server counts as unreachable, once connected.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting may take: a server behind NAT is reached through a relay
/// and given a few seconds to hole-punch first.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(8);
/// Largest answer to a probe: an `Info` with every field at its limit is under 10 KiB.
const MAX_ANSWER_BYTES: usize = 16 << 10;

#[derive(Clone, Debug)]
pub struct DiscoveredServer {
    pub peer: PeerId,
    pub info: ServerInfo,
    /// Round trip of the `Info` probe; `None` when not probed or not answered.
    pub rtt_ms: Option<f64>,
    /// The path this node reached it by, when probed.
    pub path: Option<PathInfo>,
    /// It was probed and did not answer (kept only by [`Probe::All`]).
    pub silent: bool,
    /// It offers the relay service to peers behind NAT (known once probed).
    pub relays: bool,
}

impl DiscoveredServer {
    /// The protocol version it speaks, if not this node's: such a server is named to
    /// the user, never dialled.
    pub fn other_version(&self) -> Option<u32> {
        (self.info.protocol_version != PROTOCOL_VERSION).then_some(self.info.protocol_version)
    }

    /// It may take new sessions: it speaks this node's protocol and is not leaving.
    pub fn usable(&self) -> bool {
        self.other_version().is_none() && !self.info.draining
    }
}

/// How `discover` treats servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Announcements only.
    No,
    /// Ask each for its current load; leave out those that do not answer: a stale
    /// record or an unreachable server must not attract sessions.
    Answering,
    /// Ask each, and keep those that do not answer too (with no round trip), to
    /// report them.
    All,
}

/// Servers of `model` that announced themselves, probed as `probe` says.
pub async fn discover(network: &Network, model: &ModelId, probe: bool) -> Vec<DiscoveredServer> {
    let probe = match probe {
        true => Probe::Answering,
        false => Probe::No,
    };
    discover_with(network, model, probe).await
}

pub async fn discover_with(
    network: &Network,
    model: &ModelId,
    probe: Probe,
) -> Vec<DiscoveredServer> {
    let providers = network
        .get_providers(model_key(model))
        .await
        .unwrap_or_default();
    let lookups = providers
        .into_iter()
        .filter(|p| *p != network.peer_id())
        .map(|peer| lookup(network, peer, model, probe));
    let mut found: Vec<DiscoveredServer> = join_all(lookups).await.into_iter().flatten().collect();
    found.sort_by(|a, b| a.info.range.cmp(&b.info.range).then(a.peer.cmp(&b.peer)));
    found
}

async fn lookup(
    network: &Network,
    peer: PeerId,
    model: &ModelId,
    probe: Probe,
) -> Option<DiscoveredServer> {
    let record = network.get_record(server_key(&peer)).await.ok()??;
    let info: ServerInfo = match super::record::verify(&peer, &record) {
        Ok(info) => info,
        Err(e) => {
            tracing::info!(%peer, "ignoring its announcement: {e}");
            return None;
        }
    };
    if info.model != *model {
        return None;
    }
    tracing::debug!(%peer, addrs = ?info.addrs, "announcement");
    let addrs: Vec<Multiaddr> = info.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    let _ = network.add_addresses(peer, addrs).await;
    if probe == Probe::No || info.protocol_version != PROTOCOL_VERSION {
        return Some(DiscoveredServer {
            peer,
            info,
            rtt_ms: None,
            path: None,
            silent: false,
            relays: false,
        });
    }
    let probed = tokio::time::timeout(CONNECT_TIMEOUT + PROBE_TIMEOUT, probe_info(network, peer));
    let answer = match probed.await {
        // Too busy to take even a probe's stream: alive, with no session to spare.
        Ok(Some((Answer::Busy, rtt_ms))) => {
            let busy = ServerInfo {
                free_sessions: 0,
                ..info.clone()
            };
            Some((busy, rtt_ms))
        }
        Ok(Some((Answer::Info(fresh), rtt_ms))) => Some((fresh, rtt_ms)),
        _ => None,
    };
    match answer {
        Some((fresh, rtt_ms)) if fresh.model == *model && fresh.validate().is_ok() => {
            // Its answer is newer than any copy of its announcement.
            let addrs = fresh.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            let _ = network.add_addresses(peer, addrs).await;
            Some(DiscoveredServer {
                peer,
                info: fresh,
                rtt_ms: Some(rtt_ms),
                path: network.path(peer).await.ok().flatten(),
                silent: false,
                relays: network.offers_relay(peer).await.unwrap_or(false),
            })
        }
        _ => {
            tracing::debug!(%peer, "server announced but did not answer a probe");
            (probe == Probe::All).then_some(DiscoveredServer {
                peer,
                info,
                rtt_ms: None,
                path: None,
                silent: true,
                relays: false,
            })
        }
    }
}

/// What a server answered a probe with.
#[derive(Debug)]
pub enum Answer {
    Info(ServerInfo),
    /// It had no stream to spare: it is alive, and full.
    Busy,
}

/// Asks `peer` for its current [`ServerInfo`]; returns its answer with the round trip
/// in ms.
pub async fn probe_info(network: &Network, peer: PeerId) -> Option<(Answer, f64)> {
    let open = tokio::time::timeout(CONNECT_TIMEOUT, network.open_stream(peer));
    let mut stream = open.await.ok()?.ok()?;
    // The first exchange on a fresh stream includes protocol negotiation; time a second.
    let mut answer = None;
    for _ in 0..2 {
        let start = Instant::now();
        write_message(&mut stream, &ClientMessage::Info)
            .await
            .ok()?;
        let rtt = start.elapsed().as_secs_f64() * 1e3;
        match read_message(&mut stream, MAX_ANSWER_BYTES).await.ok()? {
            ServerMessage::Info(info) => answer = Some((Answer::Info(info), rtt)),
            ServerMessage::Busy { .. } => return Some((Answer::Busy, rtt)),
            _ => return None,
        }
    }
    answer
}
