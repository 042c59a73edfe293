//! Signing this node's announcement, and checking everyone else's: what the DHT
//! stores and what clients route by. A record is accepted only if it is signed by the
//! key of the peer it is stored under, is fresh, and describes a sane server.

use std::time::{SystemTime, UNIX_EPOCH};

use allmende_protocol::announcement::{signing_payload, SignedAnnouncement};
use allmende_protocol::ServerInfo;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::kad::RecordKey;
use libp2p::PeerId;

use super::keys;

/// How far an announcement's issue time may be from now: its TTL plus clock skew.
pub const MAX_AGE_SECS: u64 = 90;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("malformed announcement: {0}")]
    Malformed(String),
    #[error("announcement is not signed by the peer it names")]
    WrongSigner,
    #[error("announcement signature does not verify")]
    BadSignature,
    #[error("{0}")]
    Invalid(String),
    #[error("record key is not an Allmende server key")]
    UnknownKey,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The signed, encoded announcement of `info` by `keypair`'s peer.
pub fn sign(keypair: &Keypair, info: &ServerInfo) -> Result<Vec<u8>, RecordError> {
    let info =
        allmende_protocol::encode(info).map_err(|e| RecordError::Malformed(e.to_string()))?;
    let issued_at = now();
    let signature = keypair
        .sign(&signing_payload(&info, issued_at))
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    let announcement = SignedAnnouncement {
        info,
        issued_at,
        public_key: keypair.public().encode_protobuf(),
        signature,
    };
    allmende_protocol::encode(&announcement).map_err(|e| RecordError::Malformed(e.to_string()))
}

/// The server info `peer` announced in `value`, if the record is genuine and sane.
pub fn verify(peer: &PeerId, value: &[u8]) -> Result<ServerInfo, RecordError> {
    verify_announced(peer, value).map(|a| a.info)
}

/// A genuine announcement: what the server said, and when (its clock, in seconds).
#[derive(Debug)]
pub struct Announced {
    pub info: ServerInfo,
    pub issued_at: u64,
}

/// [`verify`], keeping when the announcement was issued.
pub fn verify_announced(peer: &PeerId, value: &[u8]) -> Result<Announced, RecordError> {
    let malformed = |e: &dyn std::fmt::Display| RecordError::Malformed(e.to_string());
    let announcement: SignedAnnouncement =
        allmende_protocol::decode(value).map_err(|e| malformed(&e))?;
    announcement
        .check(now(), MAX_AGE_SECS)
        .map_err(|e| RecordError::Invalid(e.to_string()))?;
    let key =
        PublicKey::try_decode_protobuf(&announcement.public_key).map_err(|e| malformed(&e))?;
    if key.to_peer_id() != *peer {
        return Err(RecordError::WrongSigner);
    }
    let payload = signing_payload(&announcement.info, announcement.issued_at);
    if !key.verify(&payload, &announcement.signature) {
        return Err(RecordError::BadSignature);
    }
    let info: ServerInfo =
        allmende_protocol::decode(&announcement.info).map_err(|e| malformed(&e))?;
    info.validate()
        .map_err(|e| RecordError::Invalid(e.to_string()))?;
    Ok(Announced {
        info,
        issued_at: announcement.issued_at,
    })
}

/// Checks a record another peer asks this node to store, or a lookup returns: it must
/// be an announcement under the key of the peer that signed it.
pub fn verify_stored(key: &RecordKey, value: &[u8]) -> Result<Announced, RecordError> {
    let peer = keys::server_key_peer(key).ok_or(RecordError::UnknownKey)?;
    verify_announced(&peer, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use allmende_protocol::{LayerRange, ModelId};

    fn info() -> ServerInfo {
        ServerInfo {
            model: ModelId([3; 32]),
            model_name: "m".into(),
            block_count: 30,
            range: LayerRange::new(0, 10),
            protocol_version: 1,
            numerics_version: 1,
            throughput: 10.0,
            free_sessions: 1,
            max_sessions: 2,
            addrs: vec![],
            draining: false,
        }
    }

    #[test]
    fn accepts_its_own_signature_only_for_its_own_peer() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let record = sign(&key, &info()).unwrap();
        assert_eq!(verify(&peer, &record).unwrap(), info());
        assert_eq!(
            verify_stored(&keys::server_key(&peer), &record)
                .unwrap()
                .info,
            info()
        );

        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(
            verify(&other, &record),
            Err(RecordError::WrongSigner)
        ));
        assert!(matches!(
            verify_stored(&keys::server_key(&other), &record),
            Err(RecordError::WrongSigner)
        ));
        assert!(matches!(
            verify_stored(&RecordKey::new(&"/elsewhere"), &record),
            Err(RecordError::UnknownKey)
        ));
    }

    #[test]
    fn refuses_tampered_and_insane_announcements() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let mut announcement: SignedAnnouncement =
            allmende_protocol::decode(&sign(&key, &info()).unwrap()).unwrap();
        // Claim more free sessions than were signed.
        let mut forged = info();
        forged.free_sessions = 99;
        announcement.info = allmende_protocol::encode(&forged).unwrap();
        let bytes = allmende_protocol::encode(&announcement).unwrap();
        assert!(matches!(
            verify(&peer, &bytes),
            Err(RecordError::BadSignature)
        ));

        let mut insane = info();
        insane.range = LayerRange::new(20, 40);
        let bytes = sign(&key, &insane).unwrap();
        assert!(matches!(
            verify(&peer, &bytes),
            Err(RecordError::Invalid(_))
        ));

        assert!(matches!(
            verify(&peer, b"garbage"),
            Err(RecordError::Malformed(_))
        ));
    }
}
