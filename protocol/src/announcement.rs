//! A server's DHT announcement, signed with its peer key so that no peer can announce
//! on behalf of another and old announcements cannot be replayed.
//!
//! The signature covers [`signing_payload`]: a domain tag, the issue time and the
//! encoded [`crate::ServerInfo`]. Checking it needs the peer's public key, which
//! travels in the record (protobuf-encoded, as libp2p writes it); the reader checks
//! that the key belongs to the peer the record is stored under.

use serde::{Deserialize, Serialize};

/// Separates announcement signatures from any other use of a peer's key.
pub const DOMAIN: &[u8] = b"allmende/announcement/1";
/// Longest public key accepted (an Ed25519 key is 36 bytes protobuf-encoded; RSA
/// keys are larger but bounded).
pub const MAX_PUBLIC_KEY_BYTES: usize = 1024;
/// Longest signature accepted.
pub const MAX_SIGNATURE_BYTES: usize = 1024;
/// Longest encoded server info accepted.
pub const MAX_INFO_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    /// The bincode-encoded `ServerInfo`.
    #[serde(with = "serde_bytes")]
    pub info: Vec<u8>,
    /// Seconds since the Unix epoch when the server signed this.
    pub issued_at: u64,
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AnnouncementError {
    #[error("announcement field {0} is too large")]
    TooLarge(&'static str),
    #[error("announcement was issued {0} s from now, outside the accepted window")]
    Stale(i64),
}

/// The bytes a server signs.
pub fn signing_payload(info: &[u8], issued_at: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(DOMAIN.len() + 8 + info.len());
    payload.extend_from_slice(DOMAIN);
    payload.extend_from_slice(&issued_at.to_le_bytes());
    payload.extend_from_slice(info);
    payload
}

impl SignedAnnouncement {
    /// Checks sizes, and that it was issued within `max_age_secs` of `now` (either way,
    /// for clock skew). The signature is checked by the caller, which holds the
    /// cryptography.
    pub fn check(&self, now: u64, max_age_secs: u64) -> Result<(), AnnouncementError> {
        if self.info.len() > MAX_INFO_BYTES {
            return Err(AnnouncementError::TooLarge("info"));
        }
        if self.public_key.len() > MAX_PUBLIC_KEY_BYTES {
            return Err(AnnouncementError::TooLarge("public_key"));
        }
        if self.signature.len() > MAX_SIGNATURE_BYTES {
            return Err(AnnouncementError::TooLarge("signature"));
        }
        if now.abs_diff(self.issued_at) > max_age_secs {
            let ahead = i128::from(self.issued_at) - i128::from(now);
            let ahead = ahead.clamp(i64::MIN.into(), i64::MAX.into()) as i64;
            return Err(AnnouncementError::Stale(ahead));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(issued_at: u64) -> SignedAnnouncement {
        SignedAnnouncement {
            info: vec![1, 2, 3],
            issued_at,
            public_key: vec![0; 36],
            signature: vec![0; 64],
        }
    }

    #[test]
    fn refuses_old_future_and_oversized_announcements() {
        assert!(announcement(1000).check(1010, 60).is_ok());
        assert_eq!(
            announcement(1000).check(1100, 60),
            Err(AnnouncementError::Stale(-100))
        );
        assert_eq!(
            announcement(1200).check(1100, 60),
            Err(AnnouncementError::Stale(100))
        );
        // Times anywhere in u64's range are compared without overflow.
        assert!(matches!(
            announcement(u64::MAX).check(1_800_000_000, 60),
            Err(AnnouncementError::Stale(i64::MAX))
        ));
        assert!(matches!(
            announcement(0).check(u64::MAX, 60),
            Err(AnnouncementError::Stale(i64::MIN))
        ));
        let mut big = announcement(1000);
        big.public_key = vec![0; MAX_PUBLIC_KEY_BYTES + 1];
        assert_eq!(
            big.check(1000, 60),
            Err(AnnouncementError::TooLarge("public_key"))
        );
    }

    #[test]
    fn the_payload_binds_time_and_content() {
        assert_ne!(signing_payload(&[1], 5), signing_payload(&[1], 6));
        assert_ne!(signing_payload(&[1], 5), signing_payload(&[2], 5));
        assert!(signing_payload(&[1], 5).starts_with(DOMAIN));
    }
}
