//! The DHT keys Allmende uses.

use allmende_protocol::ModelId;
use libp2p::kad::RecordKey;
use libp2p::PeerId;

/// Servers of a model register as providers of this key.
pub fn model_key(model: &ModelId) -> RecordKey {
    RecordKey::new(&format!("{MODEL_PREFIX}{}", model.to_hex()))
}

const SERVER_PREFIX: &str = "/allmende/server/";
const MODEL_PREFIX: &str = "/allmende/model/";

/// A server's announcement record.
pub fn server_key(peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("{SERVER_PREFIX}{peer}"))
}

/// The peer a server record key belongs to.
pub fn server_key_peer(key: &RecordKey) -> Option<PeerId> {
    std::str::from_utf8(key.as_ref())
        .ok()?
        .strip_prefix(SERVER_PREFIX)?
        .parse()
        .ok()
}

/// Whether `key` is a model's provider key.
pub fn is_model_key(key: &RecordKey) -> bool {
    std::str::from_utf8(key.as_ref()).is_ok_and(|k| {
        k.strip_prefix(MODEL_PREFIX)
            .is_some_and(|hex| ModelId::from_hex(hex).is_some())
    })
}
