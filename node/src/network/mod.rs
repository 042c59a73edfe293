//! The peer-to-peer layer: a libp2p swarm (TCP with Noise and Yamux, QUIC, Kademlia,
//! mDNS, identify, ping, and raw streams for the inference protocol).
//!
//! As in rust-libp2p's file-sharing example, the network is split into a cloneable
//! [`Network`] handle, which sends [`Command`]s with a oneshot reply, and one
//! [`event_loop::EventLoop`] task that alone owns the `Swarm`. Inference streams are
//! opened through `libp2p_stream::Control` without going through the event loop.

pub mod addresses;
mod behaviour;
mod bootstrap;
mod connectivity;
mod dht_store;
pub mod dialable;
pub mod discovery;
mod event_loop;
mod frame_budget;
pub mod framing;
pub mod identity;
pub mod keys;
pub mod paths;
pub mod reachability;
pub mod record;
mod record_lookup;
mod relay_limits;
pub mod report;

use std::collections::HashSet;
use std::time::Duration;

use libp2p::kad::RecordKey;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

pub use behaviour::{RelayLimits, Services};
pub use bootstrap::parse_list as parse_bootstrap_list;
pub use connectivity::ReachabilityReport;
pub use event_loop::NetworkConfig;
pub use paths::{PathInfo, PathKind};

/// Capacity of the command channel: commands are small and the loop drains them
/// quickly; a full channel means the loop is stuck and callers should wait.
const COMMAND_CAPACITY: usize = 64;

/// The inference protocol as a libp2p stream protocol.
pub const INFERENCE_PROTOCOL: StreamProtocol =
    StreamProtocol::new(allmende_protocol::PROTOCOL_NAME);
/// Fetching a model's manifest and tensors from peers.
pub const WEIGHTS_PROTOCOL: StreamProtocol =
    StreamProtocol::new(allmende_protocol::weights::WEIGHTS_PROTOCOL_NAME);
/// The version before, whose streams are answered with an error naming both.
pub const PREVIOUS_INFERENCE_PROTOCOL: StreamProtocol =
    StreamProtocol::new(allmende_protocol::inference::PREVIOUS_PROTOCOL_NAME);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    #[error("cannot build the network: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("no peer reachable at {0} within {1:?}")]
    BootstrapTimeout(String, Duration),
    #[error("the network task has stopped")]
    Stopped,
    #[error("DHT operation failed: {0}")]
    Dht(String),
    #[error("cannot open a stream to {peer}: {reason}")]
    OpenStream { peer: PeerId, reason: String },
    #[error("cannot read identity file {path}: {reason}")]
    Identity { path: String, reason: String },
    #[error("identity file {path} is held by another running node{holder}; give each node on this machine its own key file with --identity FILE")]
    IdentityInUse { path: String, holder: String },
}

#[derive(Debug)]
pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    WaitForPeers(oneshot::Sender<()>),
    AddAddresses(PeerId, Vec<Multiaddr>),
    Addresses(PeerId, oneshot::Sender<Vec<Multiaddr>>),
    StartProviding(RecordKey),
    StopProviding(RecordKey),
    PutRecord {
        key: RecordKey,
        value: Vec<u8>,
        ttl: Duration,
    },
    RemoveRecord(RecordKey),
    GetProviders(RecordKey, oneshot::Sender<HashSet<PeerId>>),
    GetRecord(RecordKey, oneshot::Sender<Option<Vec<u8>>>),
    Ban(PeerId, Duration),
    /// Connect to a peer if needed, and reply once its path has settled.
    Settle(PeerId, oneshot::Sender<Result<PathInfo, String>>),
    Path(PeerId, oneshot::Sender<Option<PathInfo>>),
    OffersRelay(PeerId, oneshot::Sender<bool>),
    Reachability(oneshot::Sender<ReachabilityReport>),
}

/// A cloneable handle to the running network.
#[derive(Clone)]
pub struct Network {
    peer_id: PeerId,
    /// Signs this node's announcements.
    keypair: libp2p::identity::Keypair,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    addresses: addresses::PeerAddresses,
}

impl Network {
    /// Builds the swarm, starts listening and dialling, and spawns the event loop.
    pub async fn start(config: NetworkConfig) -> Result<Self, NetworkError> {
        let (commands, receiver) = mpsc::channel(COMMAND_CAPACITY);
        let keypair = config.keypair.clone();
        let addresses = addresses::PeerAddresses::default();
        let (peer_id, control) = event_loop::spawn(config, receiver, addresses.clone())?;
        let network = Self {
            peer_id,
            keypair,
            commands,
            control,
            addresses,
        };
        Ok(network)
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The IP address a connected peer reaches this node from.
    pub fn address_of(&self, peer: &PeerId) -> Option<std::net::IpAddr> {
        self.addresses.get(peer)
    }

    /// This node's announcement of `info`, signed with its key.
    pub fn sign_announcement(
        &self,
        info: &allmende_protocol::ServerInfo,
    ) -> Result<Vec<u8>, record::RecordError> {
        record::sign(&self.keypair, info)
    }

    async fn send(&self, command: Command) -> Result<(), NetworkError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// Addresses the node listens on, each ending in `/p2p/<peer id>`.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetworkError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Waits until the DHT knows at least one other peer, or `timeout` passes.
    pub async fn wait_for_peers(&self, timeout: Duration, what: &str) -> Result<(), NetworkError> {
        let wait = self.ask(Command::WaitForPeers);
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(NetworkError::BootstrapTimeout(what.to_string(), timeout)),
        }
    }

    pub async fn add_addresses(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    ) -> Result<(), NetworkError> {
        self.send(Command::AddAddresses(peer, addrs)).await
    }

    /// The addresses `peer` announced (as this node would dial them), once learned.
    pub async fn addresses(&self, peer: PeerId) -> Result<Vec<Multiaddr>, NetworkError> {
        self.ask(|tx| Command::Addresses(peer, tx)).await
    }

    pub async fn start_providing(&self, key: RecordKey) -> Result<(), NetworkError> {
        self.send(Command::StartProviding(key)).await
    }

    pub async fn stop_providing(&self, key: RecordKey) -> Result<(), NetworkError> {
        self.send(Command::StopProviding(key)).await
    }

    pub async fn put_record(
        &self,
        key: RecordKey,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), NetworkError> {
        self.send(Command::PutRecord { key, value, ttl }).await
    }

    pub async fn remove_record(&self, key: RecordKey) -> Result<(), NetworkError> {
        self.send(Command::RemoveRecord(key)).await
    }

    pub async fn get_providers(&self, key: RecordKey) -> Result<HashSet<PeerId>, NetworkError> {
        self.ask(|tx| Command::GetProviders(key, tx)).await
    }

    pub async fn get_record(&self, key: RecordKey) -> Result<Option<Vec<u8>>, NetworkError> {
        self.ask(|tx| Command::GetRecord(key, tx)).await
    }

    /// Disconnects `peer` and refuses its connections for `duration`.
    pub async fn ban(&self, peer: PeerId, duration: Duration) -> Result<(), NetworkError> {
        self.send(Command::Ban(peer, duration)).await
    }

    /// The path streams to `peer` take now, if connected.
    pub async fn path(&self, peer: PeerId) -> Result<Option<PathInfo>, NetworkError> {
        self.ask(|tx| Command::Path(peer, tx)).await
    }

    /// Whether `peer` offers the relay service (as its identify says).
    pub async fn offers_relay(&self, peer: PeerId) -> Result<bool, NetworkError> {
        self.ask(|tx| Command::OffersRelay(peer, tx)).await
    }

    /// Whether and how this node can be reached, and what it announces.
    pub async fn reachability(&self) -> Result<ReachabilityReport, NetworkError> {
        self.ask(Command::Reachability).await
    }

    /// Opens an inference-protocol stream to `peer`, dialling it if needed. When the
    /// only way to `peer` is a relay, it first gives hole punching a few seconds to
    /// find a direct path, so sessions do not start on a connection about to go.
    pub async fn open_stream(&self, peer: PeerId) -> Result<libp2p::Stream, NetworkError> {
        self.open_stream_of(peer, INFERENCE_PROTOCOL).await
    }

    /// Like [`Network::open_stream`], for `protocol` (another version of it, say).
    pub async fn open_stream_of(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, NetworkError> {
        self.ask(|tx| Command::Settle(peer, tx))
            .await?
            .map_err(|reason| NetworkError::OpenStream { peer, reason })?;
        self.control
            .clone()
            .open_stream(peer, protocol)
            .await
            .map_err(|e| NetworkError::OpenStream {
                peer,
                reason: e.to_string(),
            })
    }

    /// Incoming inference-protocol streams. Only one caller may accept.
    pub fn accept(&self) -> Result<libp2p_stream::IncomingStreams, NetworkError> {
        self.accept_protocol(INFERENCE_PROTOCOL)
    }

    /// Incoming streams of `protocol`. Only one caller may accept each protocol.
    pub fn accept_protocol(
        &self,
        protocol: StreamProtocol,
    ) -> Result<libp2p_stream::IncomingStreams, NetworkError> {
        self.control
            .clone()
            .accept(protocol)
            .map_err(|e| NetworkError::Build(e.to_string()))
    }
}
