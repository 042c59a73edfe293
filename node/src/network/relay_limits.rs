//! What a relay lends to peers behind NAT. libp2p's defaults (2 minutes and 128 KiB
//! a circuit) suit signalling, not inference: a session relayed under them would end
//! after a few dozen tokens. A relay here carries sessions, within limits that bound
//! what one peer can take of its bandwidth and connections.

use std::time::Duration;

use libp2p::relay;

#[derive(Clone, Debug, PartialEq)]
pub struct RelayLimits {
    /// Circuits relayed at once, in all and for one peer.
    pub circuits: usize,
    pub circuits_per_peer: usize,
    /// A circuit ends after this long or this many bytes (each way counted); its
    /// client then reconnects, directly if it can, and moves its sessions.
    pub circuit_duration: Duration,
    pub circuit_bytes: u64,
    /// Peers holding a reservation (an address on this relay) at once.
    pub reservations: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            circuits: 64,
            circuits_per_peer: 8,
            circuit_duration: Duration::from_secs(60 * 60),
            circuit_bytes: 256 << 20,
            reservations: 128,
        }
    }
}

impl RelayLimits {
    /// libp2p's relay configuration: its per-peer and per-IP rate limits on new
    /// reservations and circuits, with these limits.
    pub fn config(&self) -> relay::Config {
        relay::Config {
            max_reservations: self.reservations,
            max_reservations_per_peer: 4,
            max_circuits: self.circuits,
            max_circuits_per_peer: self.circuits_per_peer,
            max_circuit_duration: self.circuit_duration,
            max_circuit_bytes: self.circuit_bytes,
            ..relay::Config::default()
        }
    }
}
