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

/// Reads messages from one stream, keeping its progress through a frame in itself
/// rather than in the future: a read dropped half-way (by a `select!` whose other
/// branch won) loses no bytes, and the next read goes on where it stopped. Each await
/// is a single `read`, which consumes nothing unless it completes.
#[derive(Default)]
pub struct FrameReader {
    prefix: [u8; PREFIX_BYTES],
    filled: usize,
    /// The payload being read, once the prefix has been checked, and its bytes so far.
    payload: Option<(Vec<u8>, usize)>,
}

impl FrameReader {
    pub async fn read_message<T, S>(&mut self, stream: &mut S) -> Result<T, FrameIoError>
    where
        T: DeserializeOwned,
        S: AsyncRead + Unpin,
    {
        let payload = self.read_frame(stream).await?;
        Ok(allmende_protocol::decode(&payload)?)
    }

    /// Reads one frame's payload, undecoded: the caller decides where to decode it
    /// (a large one off the async runtime).
    pub async fn read_frame<S>(&mut self, stream: &mut S) -> Result<Vec<u8>, FrameIoError>
    where
        S: AsyncRead + Unpin,
    {
        while self.filled < PREFIX_BYTES {
            match stream.read(&mut self.prefix[self.filled..]).await? {
                0 if self.filled == 0 => return Err(FrameIoError::Closed),
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                n => self.filled += n,
            }
        }
        let (payload, got) = match &mut self.payload {
            Some(partial) => partial,
            None => {
                let len = frame::payload_len(self.prefix)?;
                self.payload.insert((vec![0u8; len], 0))
            }
        };
        while *got < payload.len() {
            match stream.read(&mut payload[*got..]).await? {
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                n => *got += n,
            }
        }
        let (payload, _) = self.payload.take().unwrap_or_default();
        self.filled = 0;
        Ok(payload)
    }
}

/// Frames up to this size are decoded (and replies encoded) where they are handled;
/// larger ones on a blocking thread. A hand-off costs tens of microseconds, which a
/// decode step (a few KB) should not pay, while decoding or checking a prefill or a
/// replay of megabytes would hold up every other stream on the runtime.
pub const INLINE_CODEC_BYTES: usize = 256 << 10;

/// Decodes `payload`: inline when small, else on a blocking thread.
pub async fn decode_frame<T>(payload: Vec<u8>) -> Result<T, FrameIoError>
where
    T: DeserializeOwned + Send + 'static,
{
    if payload.len() <= INLINE_CODEC_BYTES {
        return Ok(allmende_protocol::decode(&payload)?);
    }
    tokio::task::spawn_blocking(move || allmende_protocol::decode(&payload))
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
        .map_err(FrameIoError::from)
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
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Hands out its bytes a few at a time, answering `Pending` between them.
    struct Trickle {
        bytes: Vec<u8>,
        at: usize,
        ready: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(3).min(self.bytes.len() - self.at);
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_cancelled_read_loses_no_bytes() {
        use futures::FutureExt;
        let messages = [
            ClientMessage::Close { session: 3 },
            ClientMessage::Info,
            ClientMessage::Close { session: u64::MAX },
        ];
        let mut bytes = Vec::new();
        for m in &messages {
            bytes.extend(allmende_protocol::encode_frame(m).unwrap());
        }
        let mut stream = Trickle {
            bytes,
            at: 0,
            ready: false,
        };
        let mut reader = FrameReader::default();
        let mut got = Vec::new();
        // Poll each read once and drop it unless it finished: the way a `select!`
        // drops the branch that lost.
        for _ in 0..1000 {
            if got.len() == messages.len() {
                break;
            }
            if let Some(m) = reader
                .read_message::<ClientMessage, _>(&mut stream)
                .now_or_never()
            {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got, messages);
    }
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
            let err = FrameReader::default()
                .read_message::<ClientMessage, _>(&mut cut.clone())
                .await
                .unwrap_err();
            assert!(matches!(err, FrameIoError::Io(_)), "{err}");
            let err = read_message::<ClientMessage, _>(&mut cut)
                .await
                .unwrap_err();
            assert!(matches!(err, FrameIoError::Io(_)), "{err}");
        });
    }
}
