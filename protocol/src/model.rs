//! The identity of a model: a digest of its manifest (metadata, tensor table and the
//! hashes of its weights), so that every node holding the model agrees on the id
//! without any registry.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The hash of the model's [`Manifest`](crate::Manifest): its metadata, tensor table
/// and the hashes of its weights, not how a file lays them out.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelId(pub [u8; 32]);

impl ModelId {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 12 hex digits: enough to tell models apart in logs and tables.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ModelId([0xab; 32]);
        assert_eq!(ModelId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(id.short(), "abababababab");
        assert_eq!(ModelId::from_hex("zz"), None);
        assert_eq!(ModelId::from_hex(&"g".repeat(64)), None);
    }
}
