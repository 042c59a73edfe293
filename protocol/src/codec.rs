//! The one way bytes become messages: bincode 2 with an explicit size limit.
//!
//! bincode without a limit trusts length prefixes; a crafted 2^40 prefix aborts the
//! process on allocation. With `with_limit` the decoder refuses it before allocating.

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use bincode::enc::write::SizeWriter;
use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{self, PREFIX_BYTES};

/// Largest encoded message accepted from a peer: room for a 16k-token prefill of a
/// 4096-wide model in f32 (256 MiB would be too generous for one frame; 64 MiB
/// covers realistic prefill chunks and keeps a hostile frame cheap to refuse).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

type Bounded = Configuration<LittleEndian, Varint, Limit<MAX_MESSAGE_BYTES>>;

fn bounded() -> Bounded {
    config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] bincode::error::DecodeError),
    #[error("message has {0} trailing bytes after its end")]
    TrailingBytes(usize),
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("manifest is not in canonical form (layout keys, or keys or tensors out of order)")]
    NotCanonical,
}

pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(message, bounded())?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// `message` as a whole frame: the length prefix, then the message encoded straight
/// after it. The size is measured first, so the message's bytes (a tensor's values)
/// are written once, into a buffer of the right size.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    let mut size = SizeWriter::default();
    bincode::serde::encode_into_writer(message, &mut size, bounded())?;
    let len = size.bytes_written;
    let prefix = frame::prefix(len).map_err(|_| CodecError::TooLarge(len))?;
    let mut bytes = Vec::with_capacity(PREFIX_BYTES + len);
    bytes.extend_from_slice(&prefix);
    bincode::serde::encode_into_std_write(message, &mut bytes, bounded())?;
    Ok(bytes)
}

/// Decodes exactly one message from `bytes`, bounded by [`MAX_MESSAGE_BYTES`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    // Borrowing decoding hands byte strings to the message's own decoding (a tensor
    // converts them to values directly) instead of copying them into a buffer first.
    let (message, used) = bincode::serde::borrow_decode_from_slice(bytes, bounded())?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - used));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LayerRange, WireDType, WireTensor};

    #[test]
    fn round_trips() {
        let t = WireTensor::from_f32(&[1, 1, 3], &[1.0, 2.0, 3.0], WireDType::F32).unwrap();
        let msg = (LayerRange::new(0, 10), t);
        let back: (LayerRange, WireTensor) = decode(&encode(&msg).unwrap()).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn frames_are_the_prefix_then_the_message() {
        let msg = (LayerRange::new(0, 10), "frame".to_string());
        let frame = encode_frame(&msg).unwrap();
        let payload = encode(&msg).unwrap();
        assert_eq!(frame[..PREFIX_BYTES], (payload.len() as u32).to_le_bytes());
        assert_eq!(frame[PREFIX_BYTES..], payload[..]);
        assert_eq!(frame.capacity(), frame.len());
    }

    #[test]
    fn refuses_a_huge_length_prefix_without_allocating() {
        // A Vec<u8> whose varint length prefix claims 2^40 bytes (0xfd = u64 follows).
        let mut bytes = vec![0xfd];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = decode::<Vec<u8>>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Malformed(_)), "{err}");
    }

    #[test]
    fn refuses_truncated_and_trailing_bytes() {
        let bytes = encode(&LayerRange::new(3, 9)).unwrap();
        assert!(decode::<LayerRange>(&bytes[..1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode::<LayerRange>(&longer),
            Err(CodecError::TrailingBytes(1))
        ));
    }
}
