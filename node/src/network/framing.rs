//! Reading and writing protocol messages on a stream: a length prefix checked against
//! the limit before anything is allocated, then one bounded bincode message.

use std::io;

use allmende_protocol::frame::{self, PREFIX_BYTES};
use allmende_protocol::CodecError;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameIoError {
    /// The peer closed the stream cleanly between frames.
    #[error("stream closed")]
    Closed,
    #[error("stream error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    TooLarge(#[from] frame::FrameError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Reads one message. A tensor's values are decoded straight from the frame's bytes
/// (their one copy on the way in). A clean end of stream before a prefix is [`FrameIoError::Closed`].
pub async fn read_message<T, S>(stream: &mut S) -> Result<T, FrameIoError>
where
    T: DeserializeOwned,
    S: AsyncRead + Unpin,
{
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut filled = 0;
    while filled < PREFIX_BYTES {
        match stream.read(&mut prefix[filled..]).await? {
            0 if filled == 0 => return Err(FrameIoError::Closed),
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            n => filled += n,
        }
    }
    let len = frame::payload_len(prefix)?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(allmende_protocol::decode(&payload)?)
}

/// Writes one message and flushes it. The message is encoded straight into the frame,
/// so a tensor's values are copied once on their way out.
pub async fn write_message<T, S>(stream: &mut S, message: &T) -> Result<(), FrameIoError>
where
    T: Serialize,
    S: AsyncWrite + Unpin,
{
    let frame = allmende_protocol::encode_frame(message)?;
    write_frame(stream, &frame).await
}

/// Writes a frame made by [`allmende_protocol::encode_frame`] and flushes it.
pub async fn write_frame<S>(stream: &mut S, frame: &[u8]) -> Result<(), FrameIoError>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(frame).await?;
    stream.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use allmende_protocol::{ClientMessage, LayerRange};
    use futures::io::Cursor;

    #[test]
    fn round_trips_and_refuses_oversized_prefixes() {
        futures::executor::block_on(async {
            let mut buf = Cursor::new(Vec::new());
            write_message(&mut buf, &ClientMessage::Close { session: 3 })
                .await
                .unwrap();
            write_message(&mut buf, &LayerRange::new(1, 2))
                .await
                .unwrap();
            buf.set_position(0);
            let m: ClientMessage = read_message(&mut buf).await.unwrap();
            assert_eq!(m, ClientMessage::Close { session: 3 });
            let r: LayerRange = read_message(&mut buf).await.unwrap();
            assert_eq!(r, LayerRange::new(1, 2));
            assert!(matches!(
                read_message::<LayerRange, _>(&mut buf).await,
                Err(FrameIoError::Closed)
            ));

            let mut huge = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
            let err = read_message::<ClientMessage, _>(&mut huge)
                .await
                .unwrap_err();
            assert!(matches!(err, FrameIoError::TooLarge(_)), "{err}");

            let mut cut = Cursor::new(vec![10, 0, 0, 0, 1, 2]);
            let err = read_message::<ClientMessage, _>(&mut cut)
                .await
                .unwrap_err();
            assert!(matches!(err, FrameIoError::Io(_)), "{err}");
        });
    }
}
