//! The event loop's part that gets a node through NAT: it learns whether the node is
//! reachable (AutoNAT, UPnP, `--external-address`), reserves relay slots when it is
//! not, moves relayed connections to hole-punched ones, holds streams back until a
//! peer's path has settled, and redials bootstrap addresses while it is connected to
//! none of their nodes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError};
use libp2p::{autonat, dcutr, relay, upnp, Multiaddr, PeerId};
use tokio::sync::oneshot;

use super::bootstrap::Bootstrap;
use super::event_loop::{without_peer_id, EventLoop};
use super::paths::{PathInfo, PathKind, Paths};
use super::reachability::{choose_relays, Reachability, ReachabilityState, RelayCandidate};

/// How long a stream waits for a connection to a peer and for its path to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Between attempts to reserve relay slots.
const RELAY_RETRY: Duration = Duration::from_secs(10);
/// Peers whose announced addresses are kept for dialling.
const ANNOUNCED_PEERS: usize = 1024;

/// How this node can be reached, for logs, `status` and announcements.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReachabilityReport {
    pub status: Reachability,
    /// What this node announces: confirmed addresses (direct first), each ending
    /// in its peer id.
    pub announced: Vec<Multiaddr>,
    /// Relays holding a slot for this node.
    pub relays: Vec<String>,
    /// This node relays for others.
    pub relay_service: bool,
}

struct Waiter {
    peer: PeerId,
    /// The dial made for it, if it needed one.
    dial: Option<ConnectionId>,
    deadline: Instant,
    reply: oneshot::Sender<Result<PathInfo, String>>,
}

pub(super) struct Connectivity {
    pub paths: Paths<ConnectionId, PeerId>,
    reach: ReachabilityState,
    reported: Reachability,
    /// Peers whose identify lists the relay service.
    relay_offers: HashSet<PeerId>,
    /// The address this node dialled each directly reached peer at.
    dialled_at: HashMap<PeerId, Multiaddr>,
    /// Relay reservations asked for, by the listener that holds them.
    relays: HashMap<ListenerId, PeerId>,
    relay_retry: Instant,
    /// Hole-punched connections reported before the swarm announced them.
    punched: HashSet<ConnectionId>,
    waiters: Vec<Waiter>,
    pub(super) bootstrap: Bootstrap,
    /// Dials to bootstrap addresses under way, and the peers they reached: while
    /// none of those is connected, the bootstrap addresses are dialled again (other
    /// peers, a client that dialled in, say, do not make this node known to the
    /// swarm's DHT after its bootstrap node restarted).
    bootstrap_dials: HashSet<ConnectionId>,
    bootstrap_peers: HashSet<PeerId>,
    /// What servers announced: the addresses (relayed ones among them) to dial them
    /// at, which the DHT's routing table may not hold.
    announced: HashMap<PeerId, Vec<Multiaddr>>,
    /// Only servers reserve relay slots: a client reaches out, nobody dials it.
    serving: bool,
}

impl Connectivity {
    pub fn new(bootstrap: Bootstrap, serving: bool) -> Self {
        Self {
            paths: Paths::default(),
            reach: ReachabilityState::default(),
            reported: Reachability::Unknown,
            relay_offers: HashSet::new(),
            dialled_at: HashMap::new(),
            relays: HashMap::new(),
            relay_retry: Instant::now(),
            punched: HashSet::new(),
            waiters: Vec::new(),
            bootstrap,
            bootstrap_dials: HashSet::new(),
            bootstrap_peers: HashSet::new(),
            announced: HashMap::new(),
            serving,
        }
    }

    pub fn announced(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self.announced.len() >= ANNOUNCED_PEERS && !self.announced.contains_key(&peer) {
            // Forget a peer this node holds no connection to.
            let idle = self
                .announced
                .keys()
                .copied()
                .find(|p| !self.paths.is_connected(*p));
            if let Some(idle) = idle {
                self.announced.remove(&idle);
            } else {
                return;
            }
        }
        self.announced.insert(peer, addrs);
    }

    pub fn addresses(&self, peer: PeerId) -> Vec<Multiaddr> {
        self.announced.get(&peer).cloned().unwrap_or_default()
    }

    pub fn offers(&self, peer: PeerId) -> bool {
        self.relay_offers.contains(&peer)
    }

    pub fn offers_relay(&mut self, peer: PeerId, offers: bool) {
        match offers {
            true => self.relay_offers.insert(peer),
            false => self.relay_offers.remove(&peer),
        };
    }
}

impl EventLoop {
    pub(super) fn connection_opened(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        let c = &mut self.connectivity;
        if c.bootstrap_dials.remove(&id) {
            c.bootstrap_peers.insert(peer);
        }
        let relayed_only = c.paths.best(peer).map(|p| p.kind) == Some(PathKind::Relayed);
        let kind = if endpoint.is_relayed() {
            PathKind::Relayed
        } else if c.punched.remove(&id) || relayed_only {
            // A direct connection that appears while only a relayed one exists is
            // the hole punch's, whichever side dialled.
            PathKind::HolePunched
        } else {
            PathKind::Direct
        };
        if let (ConnectedPoint::Dialer { address, .. }, PathKind::Direct) = (endpoint, kind) {
            c.dialled_at.insert(peer, without_peer_id(address));
        }
        c.paths
            .opened(id, peer, kind, endpoint.is_dialer(), Instant::now());
        self.close_replaced_relays(peer);
    }

    pub(super) fn connection_closed(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        let c = &mut self.connectivity;
        c.paths.closed(&id);
        if !c.paths.dialled_directly(peer) {
            c.dialled_at.remove(&peer);
        }
        if endpoint.is_relayed() {
            tracing::debug!(%peer, "relayed connection closed");
        }
    }

    /// Streams open on any of a peer's connections: once a direct one exists, the
    /// relayed ones go, so new streams take the direct path.
    fn close_replaced_relays(&mut self, peer: PeerId) {
        for id in self.connectivity.paths.replaced_relays(peer) {
            tracing::debug!(%peer, "closing the relayed connection a direct one replaced");
            self.swarm.close_connection(id);
        }
    }

    pub(super) fn hole_punched(&mut self, event: dcutr::Event) {
        let peer = event.remote_peer_id;
        match event.result {
            Ok(id) => {
                tracing::info!(%peer, "hole punch succeeded: the connection is now direct");
                self.connectivity.punched.insert(id);
                self.connectivity.paths.punched(id);
                self.close_replaced_relays(peer);
            }
            Err(e) => {
                tracing::info!(%peer, "hole punch failed ({e}); staying on the relayed connection");
                self.connectivity.paths.punch_failed(peer);
            }
        }
    }

    pub(super) fn relay_event(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "a relay holds a slot for this node");
                }
                self.connectivity.reach.relay_answered(&relay_peer_id);
            }
            other => tracing::debug!("relay: {other:?}"),
        }
    }

    pub(super) fn nat_status(&mut self, event: autonat::Event) {
        if let autonat::Event::StatusChanged { old, new } = event {
            tracing::debug!("AutoNAT v1: {old:?} -> {new:?}");
            if new == autonat::NatStatus::Private {
                self.connectivity.reach.found_private();
            }
        }
    }

    pub(super) fn probed(&mut self, event: autonat::v2::client::Event) {
        match event.result {
            Ok(()) => tracing::debug!(
                server = %event.server,
                "reachable at {} (dialled back)",
                event.tested_addr
            ),
            Err(e) => {
                tracing::debug!(
                    server = %event.server,
                    "not reachable at {}: {e}",
                    event.tested_addr
                );
                self.connectivity.reach.probe_failed();
            }
        }
    }

    pub(super) fn upnp_event(&mut self, event: upnp::Event) {
        match event {
            upnp::Event::NewExternalAddr { external_addr, .. } => {
                tracing::info!("the router forwards {external_addr} to this node (UPnP)")
            }
            upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                tracing::info!("the router's UPnP mapping for {external_addr} expired")
            }
            upnp::Event::GatewayNotFound => tracing::info!("UPnP: no gateway answered"),
            upnp::Event::NonRoutableGateway => {
                tracing::info!("UPnP: the gateway is itself behind NAT; no mapping made")
            }
        }
    }

    pub(super) fn address_confirmed(&mut self, address: Multiaddr) {
        tracing::debug!("external address confirmed: {address}");
        self.connectivity.reach.confirmed(address);
    }

    pub(super) fn address_expired(&mut self, address: &Multiaddr) {
        tracing::debug!("external address expired: {address}");
        self.connectivity.reach.expired(address);
    }

    pub(super) fn listener_closed(&mut self, id: ListenerId, reason: Result<(), std::io::Error>) {
        if let Some(relay) = self.connectivity.relays.remove(&id) {
            let why = reason.err().map_or("closed".to_string(), |e| e.to_string());
            tracing::info!(%relay, "the relay no longer holds a slot for this node: {why}");
            self.connectivity.reach.relay_answered(&relay);
        }
    }

    /// Replies with the path to `peer` once it has settled, dialling it if needed.
    pub(super) fn settle(
        &mut self,
        peer: PeerId,
        reply: oneshot::Sender<Result<PathInfo, String>>,
        now: Instant,
    ) {
        if let Some(path) = self.connectivity.paths.settled(peer, now) {
            let _ = reply.send(Ok(path));
            return;
        }
        let mut dial = None;
        if !self.connectivity.paths.is_connected(peer) {
            let addrs = self
                .connectivity
                .announced
                .get(&peer)
                .cloned()
                .unwrap_or_default();
            // Dialled even while another dial (the DHT's, say, with only the peer's
            // private addresses) is under way: this one carries what it announced.
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::Disconnected)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                .build();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => dial = Some(id),
                Err(DialError::DialPeerConditionFalse(_)) => {}
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                    return;
                }
            }
        }
        self.connectivity.waiters.push(Waiter {
            peer,
            dial,
            deadline: now + SETTLE_TIMEOUT,
            reply,
        });
    }

    /// A dial failed: a stream waiting for it fails now, unless another connection
    /// to its peer exists.
    pub(super) fn dial_failed(&mut self, peer: PeerId, dial: ConnectionId, error: &str) {
        let c = &mut self.connectivity;
        if c.paths.is_connected(peer) {
            return;
        }
        let (failed, waiting) = std::mem::take(&mut c.waiters)
            .into_iter()
            .partition(|w| w.dial == Some(dial));
        c.waiters = waiting;
        for w in failed {
            let _ = w.reply.send(Err(error.to_string()));
        }
    }

    pub(super) fn answer_settled(&mut self, now: Instant) {
        let c = &mut self.connectivity;
        let mut waiting = Vec::with_capacity(c.waiters.len());
        for w in std::mem::take(&mut c.waiters) {
            let answer = match c.paths.settled(w.peer, now) {
                Some(path) => Some(Ok(path)),
                None if now >= w.deadline => Some(
                    c.paths
                        .best(w.peer)
                        .ok_or_else(|| format!("no connection within {SETTLE_TIMEOUT:?}")),
                ),
                None => None,
            };
            match answer {
                Some(answer) => {
                    let _ = w.reply.send(answer);
                }
                None if !w.reply.is_closed() => waiting.push(w),
                None => {}
            }
        }
        c.waiters = waiting;
    }

    /// Periodic upkeep: rejoin through the bootstrap addresses, reserve relay slots
    /// when unreachable, and say when reachability changes.
    pub(super) fn maintain(&mut self, now: Instant) {
        if !self.talking.is_empty() {
            self.connectivity.reach.has_peers(now);
        }
        let joined = (self.connectivity.bootstrap_peers.iter()).any(|p| self.swarm.is_connected(p));
        if let Some(addrs) = self.connectivity.bootstrap.due(joined, now) {
            let addrs = addrs.to_vec();
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            let attempt = self.connectivity.bootstrap.attempts();
            if attempt > 1 {
                tracing::info!(
                    "connected to no bootstrap node; dialling {} again (attempt {attempt}, next in {:?})",
                    list.join(", "),
                    self.connectivity.bootstrap.next_wait(now),
                );
            }
            if self.connectivity.bootstrap_dials.len() > 1024 {
                self.connectivity.bootstrap_dials.clear();
            }
            for addr in addrs {
                let dial = DialOpts::from(addr.clone());
                let id = dial.connection_id();
                match self.swarm.dial(dial) {
                    Ok(()) => {
                        self.connectivity.bootstrap_dials.insert(id);
                    }
                    Err(e) => tracing::warn!("cannot dial {addr}: {e}"),
                }
            }
        }
        self.reserve_relays(now);
        self.report_reachability(now);
        self.answer_settled(now);
    }

    fn reserve_relays(&mut self, now: Instant) {
        let c = &mut self.connectivity;
        if !c.serving || !c.reach.wants_relay(now) || now < c.relay_retry {
            return;
        }
        let candidates: Vec<RelayCandidate<PeerId>> = c
            .relay_offers
            .iter()
            .map(|&peer| RelayCandidate {
                peer,
                offers_relay: true,
                dialled_directly: c.paths.dialled_directly(peer),
                rtt_ms: c.paths.best(peer).and_then(|p| p.rtt_ms),
            })
            .collect();
        let in_use: Vec<PeerId> = c.relays.values().copied().collect();
        let chosen = choose_relays(&candidates, &in_use);
        c.relay_retry = now + RELAY_RETRY;
        for relay in chosen {
            let Some(addr) = self.connectivity.dialled_at.get(&relay) else {
                continue;
            };
            let circuit = addr
                .clone()
                .with(Protocol::P2p(relay))
                .with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::info!(%relay, "not reachable directly; asking a relay for a slot");
                    self.connectivity.relays.insert(id, relay);
                    self.connectivity.reach.relay_asked(relay);
                }
                Err(e) => tracing::warn!("cannot listen through relay {circuit}: {e}"),
            }
        }
    }

    fn report_reachability(&mut self, now: Instant) {
        let status = self.connectivity.reach.status(now);
        if status == self.connectivity.reported {
            return;
        }
        self.connectivity.reported = status;
        let report = self.reachability_report(now);
        let addrs: Vec<String> = report.announced.iter().map(|a| a.to_string()).collect();
        match status {
            Reachability::Unknown => {}
            Reachability::Public | Reachability::BehindNat => {
                tracing::info!("{}: {}", status.describe(), addrs.join(", "))
            }
            Reachability::Unreachable => tracing::warn!("{}", status.describe()),
        }
    }

    pub(super) fn reachability_report(&self, now: Instant) -> ReachabilityReport {
        let me = *self.swarm.local_peer_id();
        let c = &self.connectivity;
        let announced = c
            .reach
            .announced(&self.listen_addrs, now)
            .into_iter()
            .map(|a| match a.iter().last() {
                Some(Protocol::P2p(_)) => a,
                _ => a.with(Protocol::P2p(me)),
            })
            .collect();
        let mut relays: Vec<String> = c.relays.values().map(|p| p.to_string()).collect();
        relays.sort();
        ReachabilityReport {
            status: c.reach.status(now),
            announced,
            relays,
            relay_service: self.swarm.behaviour().relay.is_enabled(),
        }
    }
}
