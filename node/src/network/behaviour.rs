//! The composed libp2p behaviour of every Allmende node.

use std::time::Duration;

use libp2p::allow_block_list::{self, BlockedPeers};
use libp2p::autonat::{self, v2 as autonat_v2};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{dcutr, identify, mdns, ping, relay, upnp, StreamProtocol};

pub use super::relay_limits::RelayLimits;

/// Kademlia protocol name: our own DHT, separate from IPFS's.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/allmende/kad/1.0.0");
const IDENTIFY_PROTOCOL: &str = "/allmende/id/1.0.0";

/// Provider records: how long others keep ours, and how often we refresh them. A
/// server that vanishes without notice drops out of provider lists within this TTL.
pub const PROVIDER_TTL: Duration = Duration::from_secs(30);
pub const PROVIDER_REFRESH: Duration = Duration::from_secs(10);

/// Connections one peer may hold with this node: one is what it needs (streams share
/// it), a few allow for simultaneous dials and a TCP and a QUIC path at once.
const CONNECTIONS_PER_PEER: u32 = 4;
/// Handshakes in progress from peers that dialled in: each costs a Noise handshake,
/// so a flood of them is cut off here rather than in the CPU.
const PENDING_INCOMING: u32 = 128;
/// Connections in all: far above a swarm's needs, far below the file descriptors
/// and memory they would take.
const ESTABLISHED: u32 = 2048;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Peers banned for misbehaving: their connections are closed and refused.
    pub blocked: allow_block_list::Behaviour<BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    pub kademlia: kad::Behaviour<MemoryStore>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Reserves slots on relays and carries relayed connections (behind NAT).
    pub relay_client: relay::client::Behaviour,
    /// Relays for peers behind NAT (off with `--no-relay-service`).
    pub relay: Toggle<relay::Behaviour>,
    /// Upgrades relayed connections to direct ones by hole punching.
    pub dcutr: dcutr::Behaviour,
    /// Asks peers it dialled to dial this node back, to learn whether it is
    /// reachable (AutoNAT v2: one address at a time, amplification-safe).
    pub autonat_client: autonat_v2::client::Behaviour,
    /// Dials peers back for theirs.
    pub autonat_server: autonat_v2::server::Behaviour,
    /// AutoNAT v1, client and server: v2 asks only peers this node dialled, so a
    /// public node that others dial (a bootstrap node) learns it is public from v1.
    pub autonat: autonat::Behaviour,
    /// Asks the router to forward a port (off unless `--upnp`).
    pub upnp: Toggle<upnp::tokio::Behaviour>,
    pub stream: libp2p_stream::Behaviour,
}

/// AutoNAT v1, probing sooner and more often than its defaults (which wait 15 s and
/// retry every 90 s; a relay's service starts only once its node is confirmed public), so a node knows within seconds whether to look for a relay. It
/// confirms private and test-range addresses too, as v2 does: swarms on a LAN are
/// reachable at those.
fn autonat_v1_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(2),
        retry_interval: Duration::from_secs(10),
        refresh_interval: Duration::from_secs(5 * 60),
        throttle_server_period: Duration::from_secs(15),
        only_global_ips: false,
        ..autonat::Config::default()
    }
}

/// The relay service, switched on for good. Left to switch itself (on when the node
/// has a confirmed external address, off when it has none), libp2p-relay 0.22 tells
/// every connection of the change, relayed ones too, whose handlers cannot take it:
/// the node panics (seen in the WAN lab, when an address expired while a relayed
/// connection was open). Peers reserve slots only on relays they reached by dialling
/// them directly (`reachability::choose_relays`), so a node behind NAT that offers
/// the service is not chosen.
fn relay_service(peer_id: libp2p::PeerId, limits: &RelayLimits) -> relay::Behaviour {
    let mut relay = relay::Behaviour::new(peer_id, limits.config());
    relay.set_status(Some(relay::Status::Enable));
    relay
}

/// What a node offers to others beyond the inference protocol.
#[derive(Clone, Debug)]
pub struct Services {
    pub mdns: bool,
    /// Relay for peers behind NAT, within these limits.
    pub relay: Option<RelayLimits>,
    pub upnp: bool,
}

impl Behaviour {
    pub fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        services: &Services,
    ) -> Result<Self, std::io::Error> {
        let peer_id = key.public().to_peer_id();
        let mut config = kad::Config::new(KAD_PROTOCOL);
        config
            .set_provider_record_ttl(Some(PROVIDER_TTL))
            .set_provider_publication_interval(Some(PROVIDER_REFRESH))
            // Announcements are re-put by their servers with fresh load figures; the DHT
            // need not republish stale copies on its own.
            .set_publication_interval(None)
            // Every record and provider record a peer asks us to store is checked first
            // (signed, fresh, sane): see the event loop.
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_query_timeout(Duration::from_secs(10));
        let kademlia = kad::Behaviour::with_config(
            peer_id,
            MemoryStore::with_config(peer_id, super::dht_store::config()),
            config,
        );
        let mdns = match services.mdns {
            true => Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?),
            false => None,
        };
        Ok(Self {
            blocked: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(
                ConnectionLimits::default()
                    .with_max_established_per_peer(Some(CONNECTIONS_PER_PEER))
                    .with_max_pending_incoming(Some(PENDING_INCOMING))
                    .with_max_established(Some(ESTABLISHED)),
            ),
            kademlia,
            // Pushing address changes tells peers at once when a relayed address is
            // gained or lost.
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                    .with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::new(ping::Config::new()),
            mdns: mdns.into(),
            relay_client,
            relay: services
                .relay
                .as_ref()
                .map(|limits| relay_service(peer_id, limits))
                .into(),
            dcutr: dcutr::Behaviour::new(peer_id),
            // Probes a candidate address every 5 s (the default).
            autonat_client: autonat_v2::client::Behaviour::default(),
            autonat_server: autonat_v2::server::Behaviour::default(),
            autonat: autonat::Behaviour::new(peer_id, autonat_v1_config()),
            upnp: services.upnp.then(upnp::tokio::Behaviour::default).into(),
            stream: libp2p_stream::Behaviour::new(),
        })
    }
}
