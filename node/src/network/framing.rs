//! Reading and writing protocol messages on a stream: a length prefix checked against
//! the limit before anything is allocated, then one bounded bincode message.

use std::io;
use std::time::{Duration, Instant};

use allmende_protocol::frame::{self, PREFIX_BYTES};
use allmende_protocol::CodecError;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{de::DeserializeOwned, Serialize};

pub use super::frame_budget::FrameBudget;

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
    /// A frame longer than any message expected here.
    #[error("a frame of {len} bytes where at most {max} are expected")]
    Unexpected { len: usize, max: usize },
    /// Frames being received already hold the node's budget for them; this one was
    /// read and thrown away.
    #[error("no room for a frame of {0} bytes now: frames being received use the node's budget")]
    OverBudget(usize),
    /// A frame arrived slower than the reader's patience.
    #[error("a frame of {0} bytes arrived too slowly")]
    TooSlow(usize),
}

/// Reads one message of at most `max_bytes` (a peer's announced length beyond it is
/// refused before anything is read). A tensor's values are decoded straight from the
/// frame's bytes (their one copy on the way in). A clean end of stream before a prefix
/// is [`FrameIoError::Closed`].
pub async fn read_message<T, S>(stream: &mut S, max_bytes: usize) -> Result<T, FrameIoError>
where
    T: DeserializeOwned,
    S: AsyncRead + Unpin,
{
    let payload = FrameReader::new(max_bytes, None).read_frame(stream).await?;
    Ok(allmende_protocol::decode(&payload)?)
}

/// Bytes of a [`FrameBudget`] held by one frame's buffer.
#[derive(Debug)]
struct Charge {
    budget: FrameBudget,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// A frame's buffer is first this large (or the frame's length, if less), then doubles
/// as bytes arrive: a prefix alone, which costs a peer four bytes, never makes the
/// node allocate what it announces.
const FIRST_CHUNK: usize = 64 << 10;

/// One frame being read.
#[derive(Debug)]
struct Partial {
    /// Announced payload length.
    len: usize,
    /// The buffer so far (zero-filled beyond `got`).
    buf: Vec<u8>,
    got: usize,
    charge: Option<Charge>,
    /// The budget had no room for it: its bytes are read and thrown away, so that the
    /// stream stays in step and the sender can be told `Busy`.
    discarding: bool,
}

/// Reads messages from one stream, keeping its progress through a frame in itself
/// rather than in the future: a read dropped half-way (by a `select!` whose other
/// branch won) loses no bytes, and the next read goes on where it stopped. Each await
/// is a single `read`, which consumes nothing unless it completes.
#[derive(Debug)]
pub struct FrameReader {
    max_bytes: usize,
    budget: Option<FrameBudget>,
    prefix: [u8; PREFIX_BYTES],
    filled: usize,
    /// When the current frame's first byte arrived.
    started: Option<Instant>,
    /// How long a frame of a given length may take to arrive, if limited.
    patience: Option<fn(usize) -> Duration>,
    /// The payload being read, once the prefix has been checked.
    payload: Option<Partial>,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new(allmende_protocol::MAX_MESSAGE_BYTES, None)
    }
}

impl FrameReader {
    /// A reader of frames of at most `max_bytes`, their buffers charged to `budget`.
    pub fn new(max_bytes: usize, budget: Option<FrameBudget>) -> Self {
        Self {
            max_bytes,
            budget,
            prefix: [0; PREFIX_BYTES],
            filled: 0,
            started: None,
            patience: None,
            payload: None,
        }
    }

    /// Gives each frame of `len` bytes `patience(len)` from its first byte to its last;
    /// a slower one is [`FrameIoError::TooSlow`].
    pub fn with_patience(mut self, patience: fn(usize) -> Duration) -> Self {
        self.patience = Some(patience);
        self
    }

    fn deadline(&self) -> Option<Instant> {
        let len = self.payload.as_ref().map_or(0, |p| p.len);
        Some(self.started? + self.patience?(len))
    }

    pub async fn read_message<T, S>(&mut self, stream: &mut S) -> Result<T, FrameIoError>
    where
        T: DeserializeOwned,
        S: AsyncRead + Unpin,
    {
        let payload = self.read_frame(stream).await?;
        Ok(allmende_protocol::decode(&payload)?)
    }

    /// When the frame being read started arriving and how long it is (0 while only its
    /// prefix is in), if one is.
    pub fn in_progress(&self) -> Option<(Instant, usize)> {
        let len = self.payload.as_ref().map_or(0, |p| p.len);
        self.started.map(|at| (at, len))
    }

    /// Reads one frame's payload, undecoded: the caller decides where to decode it
    /// (a large one off the async runtime). A frame the budget has no room for is read
    /// to its end and thrown away, then [`FrameIoError::OverBudget`]: the stream can go
    /// on.
    pub async fn read_frame<S>(&mut self, stream: &mut S) -> Result<Vec<u8>, FrameIoError>
    where
        S: AsyncRead + Unpin,
    {
        while self.filled < PREFIX_BYTES {
            let deadline = self.deadline();
            match within(deadline, stream.read(&mut self.prefix[self.filled..])).await? {
                0 if self.filled == 0 => return Err(FrameIoError::Closed),
                0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                n => {
                    self.started.get_or_insert_with(Instant::now);
                    self.filled += n;
                }
            }
        }
        if self.payload.is_none() {
            let len = frame::payload_len(self.prefix)?;
            if len > self.max_bytes {
                return Err(FrameIoError::Unexpected {
                    len,
                    max: self.max_bytes,
                });
            }
            self.payload = Some(Partial {
                len,
                buf: Vec::new(),
                got: 0,
                charge: None,
                discarding: false,
            });
        }
        let deadline = self.deadline();
        let budget = self.budget.as_ref();
        let partial = self.payload.as_mut().expect("set above");
        let mut scratch = [0u8; 4096];
        while partial.got < partial.len {
            let into = if partial.discarding {
                let n = scratch.len().min(partial.len - partial.got);
                &mut scratch[..n]
            } else {
                if partial.got == partial.buf.len() && grow(partial, budget).is_err() {
                    partial.discarding = true;
                    partial.buf = Vec::new();
                    partial.charge = None;
                    continue;
                }
                &mut partial.buf[partial.got..]
            };
            match within(deadline, stream.read(into)).await {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => partial.got += n,
                Err(FrameIoError::TooSlow(_)) => return Err(FrameIoError::TooSlow(partial.len)),
                Err(e) => return Err(e),
            }
        }
        let Partial {
            buf,
            len,
            discarding,
            ..
        } = self.payload.take().expect("set above");
        self.filled = 0;
        self.started = None;
        match discarding {
            true => Err(FrameIoError::OverBudget(len)),
            false => Ok(buf),
        }
    }
}

/// `read`, cut off at `deadline` if there is one.
async fn within<F>(deadline: Option<Instant>, read: F) -> Result<usize, FrameIoError>
where
    F: std::future::Future<Output = io::Result<usize>>,
{
    match deadline {
        None => Ok(read.await?),
        Some(at) => match tokio::time::timeout_at(at.into(), read).await {
            Ok(read) => Ok(read?),
            Err(_) => Err(FrameIoError::TooSlow(0)),
        },
    }
}

/// Makes room for more of a frame's bytes: doubling, so that the copies add up to at
/// most the frame's length. Growth past the first chunk is charged to `budget` before
/// the memory is taken; the first chunk is not, so that small messages (every decode
/// step) pass whoever holds the budget, costing at most one chunk per open stream.
fn grow(partial: &mut Partial, budget: Option<&FrameBudget>) -> Result<(), FrameIoError> {
    let size = partial.buf.len();
    let new_size = (size * 2).max(FIRST_CHUNK).min(partial.len);
    let more = new_size - size.max(FIRST_CHUNK).min(new_size);
    if let (Some(budget), true) = (budget, more > 0) {
        if !budget.take(more) {
            return Err(FrameIoError::OverBudget(partial.len));
        }
        match &mut partial.charge {
            Some(charge) => charge.bytes += more,
            None => {
                partial.charge = Some(Charge {
                    budget: budget.clone(),
                    bytes: more,
                })
            }
        }
    }
    partial.buf.resize(new_size, 0);
    Ok(())
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
    use allmende_protocol::{ClientMessage, LayerRange, MAX_MESSAGE_BYTES as MAX};
    use futures::io::Cursor;

    /// Hands out `bytes`, then has nothing more for now (a peer that stopped sending).
    struct Stalled(Cursor<Vec<u8>>);

    impl AsyncRead for Stalled {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            match Pin::new(&mut self.0).poll_read(cx, buf) {
                Poll::Ready(Ok(0)) => Poll::Pending,
                other => other,
            }
        }
    }

    /// A frame announcing `len` bytes, of which only `sent` arrive.
    fn stalled_frame(len: u32, sent: usize) -> Stalled {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(vec![7u8; sent]);
        Stalled(Cursor::new(bytes))
    }

    #[test]
    fn a_frames_buffer_grows_with_what_arrives_and_is_charged_to_the_budget() {
        use futures::FutureExt;
        let budget = FrameBudget::new(1 << 20, 1 << 20);
        let mut reader = FrameReader::new(MAX, Some(budget.clone()));
        // 64 MiB announced, 10 bytes sent: one first chunk held (not charged), not
        // 64 MiB.
        let mut stream = stalled_frame(64 << 20, 10);
        assert!(reader.read_frame(&mut stream).now_or_never().is_none());
        assert_eq!(budget.left(), 1 << 20);
        assert_eq!(reader.in_progress().map(|(_, len)| len), Some(64 << 20));
        // 300 KB arrive: the buffer doubled up to 512 KiB, all but the first chunk
        // charged.
        let mut stream = stalled_frame(64 << 20, 300_000);
        let mut second = FrameReader::new(MAX, Some(budget.clone()));
        assert!(second.read_frame(&mut stream).now_or_never().is_none());
        assert_eq!(budget.left(), (1 << 20) - (512 << 10) + FIRST_CHUNK);
        // A third stream finds no room for its next growth: its bytes are read and
        // thrown away, holding nothing...
        let mut stream = stalled_frame(64 << 20, 600_000);
        let mut third = FrameReader::new(MAX, Some(budget.clone()));
        assert!(third.read_frame(&mut stream).now_or_never().is_none());
        assert_eq!(budget.left(), (1 << 20) - (512 << 10) + FIRST_CHUNK);
        // ...while a small message still passes.
        let mut small = Cursor::new(allmende_protocol::encode_frame(&ClientMessage::Info).unwrap());
        let m = FrameReader::new(MAX, Some(budget.clone()))
            .read_message::<ClientMessage, _>(&mut small)
            .now_or_never()
            .unwrap();
        assert_eq!(m.unwrap(), ClientMessage::Info);
        // Dropped readers give their bytes back.
        drop((reader, second, third));
        assert_eq!(budget.left(), 1 << 20);
    }

    #[test]
    fn a_frame_with_no_room_is_read_to_its_end_and_the_stream_goes_on() {
        futures::executor::block_on(async {
            let budget = FrameBudget::new(100 << 10, 100 << 10);
            let mut reader = FrameReader::new(MAX, Some(budget.clone()));
            let mut bytes = 500_000u32.to_le_bytes().to_vec();
            bytes.extend(vec![3u8; 500_000]);
            bytes.extend(allmende_protocol::encode_frame(&ClientMessage::Info).unwrap());
            let mut stream = Cursor::new(bytes);
            let err = reader.read_frame(&mut stream).await.unwrap_err();
            assert!(matches!(err, FrameIoError::OverBudget(500_000)), "{err}");
            assert_eq!(budget.left(), 100 << 10);
            let next = reader.read_message::<ClientMessage, _>(&mut stream).await;
            assert_eq!(next.unwrap(), ClientMessage::Info);
        });
    }

    #[tokio::test]
    async fn a_frame_slower_than_the_readers_patience_is_cut_off() {
        let mut reader = FrameReader::new(MAX, None).with_patience(|_| Duration::from_millis(50));
        let mut stream = stalled_frame(1000, 10);
        let err = reader.read_frame(&mut stream).await.unwrap_err();
        assert!(matches!(err, FrameIoError::TooSlow(1000)), "{err}");
    }

    #[test]
    fn a_complete_frame_gives_its_bytes_back() {
        futures::executor::block_on(async {
            let budget = FrameBudget::new(1 << 20, 1 << 20);
            let mut reader = FrameReader::new(MAX, Some(budget.clone()));
            let payload = vec![1u8; 200_000];
            let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
            bytes.extend(&payload);
            let got = reader.read_frame(&mut Cursor::new(bytes)).await.unwrap();
            assert_eq!(got, payload);
            assert_eq!(budget.left(), 1 << 20);
            assert_eq!(reader.in_progress(), None);
        });
    }

    #[test]
    fn a_frame_longer_than_expected_is_refused_before_it_is_read() {
        futures::executor::block_on(async {
            let mut stream = stalled_frame(100_000, 0);
            let err = read_message::<ClientMessage, _>(&mut stream, 4096)
                .await
                .unwrap_err();
            assert!(matches!(
                err,
                FrameIoError::Unexpected {
                    len: 100_000,
                    max: 4096
                }
            ));
        });
    }

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
            let m: ClientMessage = read_message(&mut buf, MAX).await.unwrap();
            assert_eq!(m, ClientMessage::Close { session: 3 });
            let r: LayerRange = read_message(&mut buf, MAX).await.unwrap();
            assert_eq!(r, LayerRange::new(1, 2));
            assert!(matches!(
                read_message::<LayerRange, _>(&mut buf, MAX).await,
                Err(FrameIoError::Closed)
            ));

            let mut huge = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
            let err = read_message::<ClientMessage, _>(&mut huge, MAX)
                .await
                .unwrap_err();
            assert!(matches!(err, FrameIoError::TooLarge(_)), "{err}");

            let mut cut = Cursor::new(vec![10, 0, 0, 0, 1, 2]);
            let err = FrameReader::default()
                .read_message::<ClientMessage, _>(&mut cut.clone())
                .await
                .unwrap_err();
            assert!(matches!(err, FrameIoError::Io(_)), "{err}");
            let err = read_message::<ClientMessage, _>(&mut cut, MAX)
                .await
                .unwrap_err();
            assert!(matches!(err, FrameIoError::Io(_)), "{err}");
        });
    }
}
