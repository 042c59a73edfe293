//! The task that owns the libp2p `Swarm`: it turns [`Command`]s into swarm calls and
//! swarm events into replies, keeping pending DHT queries keyed by query id.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, Quorum, Record};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, noise, tcp, yamux, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::{Command, NetworkError};

/// How long an idle connection stays open. Sessions keep their streams busy; this
/// only decides when an unused peer connection is dropped.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

pub struct NetworkConfig {
    pub keypair: Keypair,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Answer DHT queries and store records (servers); clients only ask.
    pub dht_server: bool,
}

pub(super) fn spawn(
    config: NetworkConfig,
    commands: mpsc::Receiver<Command>,
) -> Result<(PeerId, libp2p_stream::Control), NetworkError> {
    let build = |e: &dyn std::fmt::Display| NetworkError::Build(e.to_string());
    let use_mdns = config.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| build(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| build(&e))?
        .with_behaviour(|key| {
            Behaviour::new(key, use_mdns)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();

    let mode = if config.dht_server {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    };
    swarm.behaviour_mut().kademlia.set_mode(Some(mode));
    for addr in config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetworkError::Listen {
                addr,
                reason: e.to_string(),
            })?;
    }
    for addr in config.bootstrap {
        if let Some(peer) = peer_id_of(&addr) {
            swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer, without_peer_id(&addr));
        }
        // Without a /p2p suffix the peer id is learnt from the connection (identify).
        swarm.dial(addr.clone()).map_err(|e| NetworkError::Dial {
            addr,
            reason: e.to_string(),
        })?;
    }
    let peer_id = *swarm.local_peer_id();
    let control = swarm.behaviour().stream.new_control();
    let event_loop = EventLoop {
        swarm,
        commands,
        listen_addrs: Vec::new(),
        listen_waiters: Vec::new(),
        peer_waiters: Vec::new(),
        pending_providers: HashMap::new(),
        pending_records: HashMap::new(),
    };
    tokio::spawn(event_loop.run());
    Ok((peer_id, control))
}

pub fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

pub fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    listen_addrs: Vec<Multiaddr>,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    peer_waiters: Vec<oneshot::Sender<()>>,
    pending_providers: HashMap<QueryId, (HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>)>,
    pending_records: HashMap<QueryId, oneshot::Sender<Option<Vec<u8>>>>,
}

impl EventLoop {
    async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    // Every handle is gone: nobody can use the network any more.
                    None => return,
                },
            }
        }
    }

    fn known_peers(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .kademlia
            .kbuckets()
            .map(|b| b.num_entries())
            .sum()
    }

    fn notify_peer_waiters(&mut self) {
        if self.known_peers() > 0 {
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
            Command::Dial(addr, reply) => {
                let result = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| NetworkError::Dial {
                        addr,
                        reason: e.to_string(),
                    });
                let _ = reply.send(result);
            }
            Command::WaitForPeers(reply) => {
                self.peer_waiters.push(reply);
                self.notify_peer_waiters();
            }
            Command::AddAddresses(peer, addrs) => {
                for addr in addrs {
                    self.swarm.add_peer_address(peer, without_peer_id(&addr));
                }
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
                self.pending_records.insert(id, reply);
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::debug!("listening on {full}");
                self.listen_addrs.push(full);
                for waiter in self.listen_waiters.drain(..) {
                    let _ = waiter.send(self.listen_addrs.clone());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                for addr in info.listen_addrs.into_iter().filter(is_dialable) {
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
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!("connection to {peer_id:?} failed: {error}");
            }
            _ => {}
        }
    }

    fn handle_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated { .. } => self.notify_peer_waiters(),
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
                    let value = match result {
                        Ok(GetRecordOk::FoundRecord(found)) => Some(found.record.value),
                        _ => None,
                    };
                    let found = value.is_some();
                    if found || step.last {
                        if let Some(reply) = self.pending_records.remove(&id) {
                            let _ = reply.send(value);
                        }
                    }
                    if found {
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

/// Addresses worth storing for a peer: not the unspecified 0.0.0.0 / :: ones.
fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
