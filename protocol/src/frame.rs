//! Length-prefixed frames: a little-endian u32 length, then that many bytes of one
//! bincode message. The length is checked against [`MAX_MESSAGE_BYTES`] before any
//! buffer is allocated, so a hostile prefix costs nothing.

use crate::codec::MAX_MESSAGE_BYTES;

/// Bytes of the length prefix.
pub const PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(u64),
}

/// The payload length announced by a prefix, if acceptable.
pub fn payload_len(prefix: [u8; PREFIX_BYTES]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as u64;
    if len > MAX_MESSAGE_BYTES as u64 {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len as usize)
}

/// The prefix for a payload of `len` bytes.
pub fn prefix(len: usize) -> Result<[u8; PREFIX_BYTES], FrameError> {
    if len > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLarge(len as u64));
    }
    Ok((len as u32).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_the_length_before_allocation() {
        assert_eq!(payload_len(prefix(2304).unwrap()), Ok(2304));
        assert_eq!(
            payload_len([0xff; 4]),
            Err(FrameError::TooLarge(u32::MAX as u64))
        );
        assert!(prefix(MAX_MESSAGE_BYTES + 1).is_err());
    }
}
