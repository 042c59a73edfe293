//! The task that owns the libp2p `Swarm`: it turns [`Command`]s into swarm calls and
//! swarm events into replies, keeping pending DHT queries keyed by query id.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{
    self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, Quorum, Record, RecordKey,
};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, noise, tcp, yamux, Multiaddr, PeerId, Swarm, Transport};
use tokio::sync::{mpsc, oneshot};

use super::addresses::{PeerAddresses, PeerGroup};
use super::behaviour::{Behaviour, BehaviourEvent, Services, KAD_PROTOCOL};
use super::bootstrap::Bootstrap;
use super::connectivity::Connectivity;
use super::dialable::worth_dialling;
use super::record_lookup::Newest;
use super::{dht_store, keys, record, Command, NetworkError};

/// How long an idle connection stays open. Sessions keep their streams busy; this
/// only decides when an unused peer connection is dropped.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);
/// A peer with the wrong swarm key never completes the handshake (its bytes decrypt to
/// noise); give up on it after this long.
const PRIVATE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the listeners to come up before the first bootstrap dial (it
/// goes as soon as every listener has an address).
const LISTEN_GRACE: Duration = Duration::from_millis(500);

pub struct NetworkConfig {
    pub keypair: Keypair,
    /// Join only the private swarm that holds this pre-shared key.
    pub swarm_key: Option<PreSharedKey>,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// Answer DHT queries and store records (servers); clients only ask.
    pub dht_server: bool,
    /// mDNS, the relay service and UPnP.
    pub services: Services,
    /// Addresses others reach this node at (a forwarded port), confirmed without
    /// asking AutoNAT.
    pub external: Vec<Multiaddr>,
}

pub(super) fn spawn(
    config: NetworkConfig,
    commands: mpsc::Receiver<Command>,
    addresses: PeerAddresses,
) -> Result<(PeerId, libp2p_stream::Control), NetworkError> {
    let private = config.swarm_key.is_some();
    let mut swarm = match config.swarm_key {
        Some(key) => private_swarm(config.keypair, key, config.services)?,
        None => public_swarm(config.keypair, config.services)?,
    };
    let mode = if config.dht_server {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    };
    swarm.behaviour_mut().kademlia.set_mode(Some(mode));
    let listeners = config.listen.len();
    let listening = listeners > 0;
    for addr in config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetworkError::Listen {
                addr,
                reason: e.to_string(),
            })?;
    }
    for addr in config.external {
        swarm.add_external_address(addr);
    }
    for addr in &config.bootstrap {
        if let Some(peer) = peer_id_of(addr) {
            swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer, without_peer_id(addr));
        }
    }
    // Bootstrap addresses are dialled from the event loop, once the listeners are up
    // (without a /p2p suffix the peer id is learnt from the connection).
    let first_dial = Instant::now()
        + if listening {
            LISTEN_GRACE
        } else {
            Duration::ZERO
        };
    let peer_id = *swarm.local_peer_id();
    let control = swarm.behaviour().stream.new_control();
    let event_loop = EventLoop {
        swarm,
        commands,
        private,
        addresses,
        talking: HashSet::new(),
        bans: Vec::new(),
        listen_addrs: Vec::new(),
        listeners_waited: listeners,
        listeners_up: HashSet::new(),
        listen_waiters: Vec::new(),
        peer_waiters: Vec::new(),
        pending_providers: HashMap::new(),
        pending_records: HashMap::new(),
        record_senders: Default::default(),
        provider_senders: Default::default(),
        connectivity: Connectivity::new(
            Bootstrap::new(config.bootstrap, first_dial),
            config.dht_server,
        ),
    };
    tokio::spawn(event_loop.run());
    Ok((peer_id, control))
}

fn build_error(e: impl std::fmt::Display) -> NetworkError {
    NetworkError::Build(e.to_string())
}

fn behaviour(
    key: &Keypair,
    relay_client: libp2p::relay::client::Behaviour,
    services: &Services,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    Ok(Behaviour::new(key, relay_client, services)?)
}

/// TCP (Noise, Yamux) and QUIC, with DNS names, and relayed connections.
fn public_swarm(keypair: Keypair, services: Services) -> Result<Swarm<Behaviour>, NetworkError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(build_error)?
        .with_quic()
        .with_dns()
        .map_err(build_error)?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(build_error)?
        .with_behaviour(|key, relay| behaviour(key, relay, &services))
        .map_err(build_error)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build())
}

/// A private swarm: TCP only, every connection wrapped in the pre-shared key before
/// Noise. QUIC cannot carry the key, so it is off: a peer without the key cannot
/// complete any handshake. Relayed connections run inside a relay's connection, which
/// itself holds the key.
fn private_swarm(
    keypair: Keypair,
    swarm_key: PreSharedKey,
    services: Services,
) -> Result<Swarm<Behaviour>, NetworkError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                let noise = noise::Config::new(key)?;
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| PnetConfig::new(swarm_key).handshake(socket))
                        .upgrade(libp2p::core::upgrade::Version::V1)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(PRIVATE_HANDSHAKE_TIMEOUT),
                )
            },
        )
        .map_err(build_error)?
        .with_dns()
        .map_err(build_error)?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(build_error)?
        .with_behaviour(|key, relay| behaviour(key, relay, &services))
        .map_err(build_error)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build())
}

pub fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

/// `addr` without its final `/p2p/<peer id>`. A relayed address keeps its relay's
/// peer id: `/ip4/.../p2p/<relay>/p2p-circuit/p2p/<peer>` loses only `<peer>`.
pub fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if let Some(Protocol::P2p(_)) = addr.iter().last() {
        addr.pop();
    }
    addr
}

pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    private: bool,
    addresses: PeerAddresses,
    /// Peers that completed a handshake and identified as Allmende DHT nodes: the
    /// proof that this node has joined a swarm (a bootstrap address in the routing
    /// table proves nothing yet).
    pub(super) talking: HashSet<PeerId>,
    /// Banned peers and when their bans end.
    bans: Vec<(Instant, PeerId)>,
    pub(super) listen_addrs: Vec<Multiaddr>,
    /// Listeners asked for, and those that have an address: once all have, the
    /// bootstrap nodes are dialled.
    listeners_waited: usize,
    listeners_up: HashSet<libp2p::core::transport::ListenerId>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    peer_waiters: Vec<oneshot::Sender<()>>,
    pending_providers: HashMap<QueryId, (HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>)>,
    pending_records: HashMap<QueryId, PendingRecord>,
    /// Who stored which announcements and provider records here, by address.
    record_senders: dht_store::Senders<RecordKey>,
    provider_senders: dht_store::Senders<(RecordKey, PeerId)>,
    /// Reachability, relays, the paths to peers, and rejoining.
    pub(super) connectivity: Connectivity,
}

/// A record lookup under way: its answers so far, and who waits for the newest.
type PendingRecord = (Newest, oneshot::Sender<Option<Vec<u8>>>);

impl EventLoop {
    async fn run(mut self) {
        // Often enough that a stream waiting for its path opens soon after it settles.
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    self.handle_event(event);
                    self.answer_settled(Instant::now());
                }
                _ = tick.tick() => {
                    self.lift_expired_bans();
                    self.end_overdue_lookups(Instant::now());
                    self.maintain(Instant::now());
                }
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    // Every handle is gone: nobody can use the network any more.
                    None => return,
                },
            }
        }
    }

    /// Answers record lookups that heard a genuine answer a while ago, and ends them.
    fn end_overdue_lookups(&mut self, now: Instant) {
        let overdue: Vec<QueryId> = self
            .pending_records
            .iter()
            .filter(|(_, (newest, _))| newest.overdue(now))
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some((newest, reply)) = self.pending_records.remove(&id) {
                let _ = reply.send(newest.take());
            }
            if let Some(mut query) = self.swarm.behaviour_mut().kademlia.query_mut(&id) {
                query.finish();
            }
        }
    }

    fn lift_expired_bans(&mut self) {
        let now = Instant::now();
        let blocked = &mut self.swarm.behaviour_mut().blocked;
        self.bans.retain(|(until, peer)| {
            let expired = *until <= now;
            if expired {
                blocked.unblock_peer(*peer);
            }
            !expired
        });
    }

    fn notify_peer_waiters(&mut self) {
        if !self.talking.is_empty() {
            for waiter in self.peer_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    fn handle_command(&mut self, command: Command) {
        let kad = &mut self.swarm.behaviour_mut().kademlia;
        match command {
            Command::ListenAddrs(reply) => {
                if self.listen_addrs.is_empty() {
                    self.listen_waiters.push(reply);
                } else {
                    let _ = reply.send(self.listen_addrs.clone());
                }
            }
            Command::WaitForPeers(reply) => {
                self.peer_waiters.push(reply);
                self.notify_peer_waiters();
            }
            Command::AddAddresses(peer, addrs) => {
                let addrs: Vec<Multiaddr> = worth_dialling(&addrs, &self.addresses.all())
                    .iter()
                    .map(without_peer_id)
                    .collect();
                for addr in &addrs {
                    self.swarm.add_peer_address(peer, addr.clone());
                }
                self.connectivity.announced(peer, addrs);
            }
            Command::Addresses(peer, reply) => {
                let _ = reply.send(self.connectivity.addresses(peer));
            }
            Command::StartProviding(key) => {
                if let Err(e) = kad.start_providing(key) {
                    tracing::warn!("cannot announce as a provider: {e}");
                }
            }
            Command::StopProviding(key) => kad.stop_providing(&key),
            Command::PutRecord { key, value, ttl } => {
                let mut record = Record::new(key, value);
                record.expires = Some(Instant::now() + ttl);
                dht_store::make_room(kad.store_mut(), &record.key, Instant::now());
                // With no other peer yet the record is still stored locally; the next
                // refresh reaches peers that joined since.
                if let Err(e) = kad.put_record(record, Quorum::One) {
                    tracing::warn!("cannot store announcement: {e}");
                }
            }
            Command::RemoveRecord(key) => kad.remove_record(&key),
            Command::GetProviders(key, reply) => {
                let id = kad.get_providers(key);
                self.pending_providers.insert(id, (HashSet::new(), reply));
            }
            Command::GetRecord(key, reply) => {
                let id = kad.get_record(key);
                self.pending_records.insert(id, (Newest::default(), reply));
            }
            Command::Settle(peer, reply) => self.settle(peer, reply, Instant::now()),
            Command::OffersRelay(peer, reply) => {
                let _ = reply.send(self.connectivity.offers(peer));
            }
            Command::Path(peer, reply) => {
                let _ = reply.send(self.connectivity.paths.best(peer));
            }
            Command::Reachability(reply) => {
                let _ = reply.send(self.reachability_report(Instant::now()));
            }
            Command::Ban(peer, duration) => {
                tracing::warn!(%peer, "banned for {duration:?}");
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.bans.push((Instant::now() + duration, peer));
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                address,
                listener_id,
            } => {
                let full = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::debug!("listening on {full}");
                self.listen_addrs.push(full);
                for waiter in self.listen_waiters.drain(..) {
                    let _ = waiter.send(self.listen_addrs.clone());
                }
                if self.listeners_up.insert(listener_id)
                    && self.listeners_up.len() == self.listeners_waited
                {
                    let now = Instant::now();
                    self.connectivity.bootstrap.listening(now);
                    self.maintain(now);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                self.talking.insert(peer_id);
                let offers = info.protocols.contains(&libp2p::relay::HOP_PROTOCOL_NAME);
                self.connectivity.offers_relay(peer_id, offers);
                // A peer's loopback addresses reach it only from its own machine.
                let local = self
                    .addresses
                    .get(&peer_id)
                    .is_some_and(|ip| ip.is_loopback());
                let reachable = |a: &Multiaddr| is_dialable(a) && (local || !is_loopback(a));
                for addr in info.listen_addrs.into_iter().filter(reachable) {
                    self.swarm
                        .behaviour_mut()
                        .kademlia
                        .add_address(&peer_id, addr);
                }
                self.notify_peer_waiters();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if !self.swarm.is_connected(&peer) {
                        // Identify, on connection, tells whether it is one of ours.
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kademlia(event)) => self.handle_kad(event),
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                error,
                connection_id,
            } => {
                tracing::debug!("connection to {peer_id:?} failed: {error}");
                if let Some(peer) = peer_id {
                    self.dial_failed(peer, connection_id, &error.to_string());
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                if self.private {
                    // This is how a peer without the swarm's key shows up.
                    tracing::warn!(
                        "refused a connection from {send_back_addr}: the handshake failed \
                         (a peer without this private swarm's key?): {error}"
                    );
                } else {
                    tracing::debug!("incoming connection from {send_back_addr} failed: {error}");
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                self.addresses
                    .connected(peer_id, endpoint.get_remote_address());
                self.connection_opened(peer_id, connection_id, &endpoint);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                connection_id,
                endpoint,
                cause,
                ..
            } => {
                tracing::debug!(%peer_id, ?cause, "connection closed");
                self.connection_closed(peer_id, connection_id, &endpoint);
                if num_established == 0 {
                    self.talking.remove(&peer_id);
                    self.addresses.disconnected(&peer_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(libp2p::ping::Event {
                connection,
                result: Ok(rtt),
                ..
            })) => self.connectivity.paths.measured(&connection, rtt),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => self.hole_punched(event),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => self.relay_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::AutonatClient(event)) => self.probed(event),
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(event)) => self.nat_status(event),
            SwarmEvent::Behaviour(BehaviourEvent::Upnp(event)) => self.upnp_event(event),
            SwarmEvent::ExternalAddrConfirmed { address } => self.address_confirmed(address),
            SwarmEvent::ExternalAddrExpired { address } => self.address_expired(&address),
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => self.listener_closed(listener_id, reason),
            _ => {}
        }
    }

    fn handle_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => match record::verify_stored(&record.key, &record.value) {
                Ok(_) => {
                    let group = PeerGroup::of(source, self.addresses.get(&source));
                    let store = self.swarm.behaviour_mut().kademlia.store_mut();
                    let senders = &mut self.record_senders;
                    let stored = dht_store::put_from(store, senders, group, record, Instant::now());
                    if let Err(e) = stored {
                        tracing::debug!(%source, "cannot store an announcement: {e}");
                    }
                }
                Err(e) => tracing::info!(%source, "refused to store a record: {e}"),
            },
            // libp2p-kad already ensures a peer can only register itself as a provider;
            // only model keys are accepted.
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } if keys::is_model_key(&record.key) => {
                // libp2p-kad has checked that the provider is the peer that sent it.
                let source = record.provider;
                let group = PeerGroup::of(source, self.addresses.get(&source));
                let store = self.swarm.behaviour_mut().kademlia.store_mut();
                let senders = &mut self.provider_senders;
                let added =
                    dht_store::add_provider_from(store, senders, group, record, Instant::now());
                if let Err(e) = added {
                    tracing::debug!(%source, "cannot store a provider record: {e}");
                }
            }
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetProviders(result) => {
                    let done = step.last
                        || matches!(
                            result,
                            Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. })
                        )
                        || result.is_err();
                    if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                        if let Some((found, _)) = self.pending_providers.get_mut(&id) {
                            found.extend(providers);
                        }
                    }
                    if done {
                        if let Some((found, reply)) = self.pending_providers.remove(&id) {
                            let _ = reply.send(found);
                        }
                    }
                }
                QueryResult::GetRecord(result) => {
                    // Any node on the lookup's path may answer with garbage, which is
                    // passed over, or with an older genuine record: the newest of a
                    // few genuine answers is taken.
                    let mut enough = false;
                    if let Ok(GetRecordOk::FoundRecord(found)) = result {
                        match record::verify_stored(&found.record.key, &found.record.value) {
                            Ok(announced) => {
                                if let Some((newest, _)) = self.pending_records.get_mut(&id) {
                                    let (at, value) = (announced.issued_at, found.record.value);
                                    enough = newest.offer(Instant::now(), at, value);
                                }
                            }
                            Err(e) => {
                                tracing::info!(peer = ?found.peer, "passed over a record: {e}");
                            }
                        }
                    }
                    if enough || step.last {
                        if let Some((newest, reply)) = self.pending_records.remove(&id) {
                            let _ = reply.send(newest.take());
                        }
                    }
                    if enough {
                        if let Some(mut query) = self.swarm.behaviour_mut().kademlia.query_mut(&id)
                        {
                            query.finish();
                        }
                    }
                }
                QueryResult::PutRecord(Err(e)) => {
                    tracing::debug!("announcement not replicated: {e}")
                }
                QueryResult::StartProviding(Err(e)) => {
                    tracing::debug!("provider record not replicated: {e}")
                }
                _ => {}
            },
            _ => {}
        }
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// Addresses worth storing for a peer: not the unspecified 0.0.0.0 / :: ones.
fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
