//! The DHT keys Allmende uses.

use allmende_protocol::ModelId;
use libp2p::kad::RecordKey;
use libp2p::PeerId;

/// Servers of a model register as providers of this key.
pub fn model_key(model: &ModelId) -> RecordKey {
    RecordKey::new(&format!("/allmende/model/{}", model.to_hex()))
}

/// A server's announcement record.
pub fn server_key(peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("/allmende/server/{peer}"))
}
