//! One session on one server: a long-lived stream carrying the steps of one route
//! segment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use allmende_protocol::inference::{
    forward_proof, ForwardLink, NextHop, SessionToken, MAX_ADDR_LEN, MAX_HOP_ADDRS,
    MAX_REPLAY_STEPS,
};
use allmende_protocol::{
    ClientMessage, ErrorKind, ModelId, ServerMessage, WireDType, WireTensor, MAX_MESSAGE_BYTES,
};
use libp2p::{PeerId, Stream};

use super::chunks::{byte_chunks, split_steps};
use super::error::RemoteError;
use crate::client::routes::RouteSegment;
use crate::network::framing::{decode_frame, write_message, FrameIoError, FrameReader};
use crate::network::{Network, PathKind};

/// Longest wait for one server's reply to one message. A long replay on a slow server
/// is the worst case; a dead server is usually noticed much sooner, by the connection.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Replays are sent in messages of at most this many bytes of hidden states.
const REPLAY_CHUNK_BYTES: usize = MAX_MESSAGE_BYTES / 2;

/// A fresh id for an attempt at a step: increasing over the process, so over every
/// route, as the protocol asks.
pub fn next_step_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub struct SegmentSession {
    pub segment: RouteSegment,
    stream: Stream,
    /// Keeps a reply's progress when a wait for it gives up (see [`Self::output_within`]).
    reader: FrameReader,
    session: u64,
    /// Lets the previous server of the route forward steps into the session.
    token: SessionToken,
    position: u32,
    /// The server said it is shutting down: the session should move.
    pub draining: bool,
    /// The stream runs through a relay, whose circuit may end while the server
    /// is fine (a relay limits how long and how much it carries).
    pub relayed: bool,
    /// The link the server last said it handed an output on over, to the next server.
    pub forward_link: Option<ForwardLink>,
    /// Where this client reached the server: the server before it on the route is
    /// told, until it has forwarded a step here.
    addrs: Vec<String>,
}

impl SegmentSession {
    /// Opens a session on `segment`'s server.
    pub async fn open(
        network: &Network,
        model: ModelId,
        segment: RouteSegment,
        max_len: u32,
        dtype: WireDType,
    ) -> Result<Self, RemoteError> {
        let stream = network
            .open_stream(segment.peer)
            .await
            .map_err(|e| connection(&segment, e))?;
        let path = network.path(segment.peer).await.ok().flatten();
        let addrs = network.addresses(segment.peer).await.unwrap_or_default();
        let mut session = Self {
            segment,
            stream,
            reader: FrameReader::default(),
            session: 0,
            token: SessionToken::default(),
            position: 0,
            draining: false,
            relayed: path.is_some_and(|p| p.kind == PathKind::Relayed),
            forward_link: None,
            addrs: addrs
                .iter()
                .take(MAX_HOP_ADDRS)
                .map(|a| a.to_string())
                .filter(|a| a.len() <= MAX_ADDR_LEN)
                .collect(),
        };
        let open = ClientMessage::Open {
            model,
            range: session.segment.range,
            max_len,
            dtype,
        };
        // A server too busy to take a stream in at once drops it (libp2p-stream holds
        // one waiting stream per peer): the stream ends before any answer, which is
        // a busy server, not a failed one, since the connection itself is up.
        let reply = match session.exchange(&open).await {
            Err(RemoteError::Connection { reason, .. }) => {
                return Err(RemoteError::Busy {
                    peer: session.segment.peer,
                    range: session.segment.range,
                    reason: format!("the stream ended before an answer ({reason})"),
                })
            }
            reply => reply?,
        };
        match reply {
            ServerMessage::Opened {
                session: id,
                max_len: granted,
                token,
            } if granted >= max_len => {
                session.session = id;
                session.token = token;
                Ok(session)
            }
            ServerMessage::Opened {
                max_len: granted, ..
            } => Err(session.refused(
                ErrorKind::TooLong,
                format!("server allows {granted} positions, {max_len} needed"),
            )),
            ServerMessage::Busy { reason } => Err(RemoteError::Busy {
                peer: session.segment.peer,
                range: session.segment.range,
                reason,
            }),
            other => Err(session.unexpected(other)),
        }
    }

    fn refused(&self, kind: ErrorKind, message: String) -> RemoteError {
        RemoteError::Refused {
            peer: self.segment.peer,
            range: self.segment.range,
            kind,
            message,
        }
    }

    fn unexpected(&self, reply: ServerMessage<'_>) -> RemoteError {
        match reply {
            ServerMessage::Error { kind, message } => self.refused(kind, message),
            other => RemoteError::Protocol {
                peer: self.segment.peer,
                range: self.segment.range,
                reason: format!("{other:?}").chars().take(200).collect(),
            },
        }
    }

    async fn exchange(
        &mut self,
        message: &ClientMessage<'_>,
    ) -> Result<ServerMessage<'static>, RemoteError> {
        self.send(message).await?;
        self.receive().await
    }

    async fn send(&mut self, message: &ClientMessage<'_>) -> Result<(), RemoteError> {
        let write = write_message(&mut self.stream, message);
        match tokio::time::timeout(STEP_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(connection(&self.segment, e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn receive(&mut self) -> Result<ServerMessage<'static>, RemoteError> {
        // A reply of megabytes (a prefill's hidden states, or a hostile server's filler)
        // is decoded on a blocking thread, not on the runtime every stream shares.
        let reader = &mut self.reader;
        let stream = &mut self.stream;
        let read =
            async move { decode_frame::<ServerMessage>(reader.read_frame(stream).await?).await };
        match tokio::time::timeout(STEP_TIMEOUT, read).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(FrameIoError::Closed)) => {
                Err(connection(&self.segment, "the server closed the session"))
            }
            Ok(Err(e)) => Err(connection(&self.segment, e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> RemoteError {
        RemoteError::Silent {
            peer: self.segment.peer,
            range: self.segment.range,
            waited: STEP_TIMEOUT,
        }
    }

    /// Lets server `forwarder` (the one before this on the route) forward step `step`
    /// into this session, telling it where this server is if `with_addrs`.
    pub fn hop(&self, forwarder: &PeerId, step: u64, with_addrs: bool) -> NextHop {
        let proof = forward_proof(
            &self.token,
            &forwarder.to_bytes(),
            self.session,
            step,
            self.position,
        );
        NextHop {
            peer: self.segment.peer.to_bytes(),
            session: self.session,
            proof,
            addrs: match with_addrs {
                true => self.addrs.clone(),
                false => Vec::new(),
            },
        }
    }

    /// Sends step `step`, naming the servers after this one (`forward`) if the
    /// output should go on to them directly. Its output comes with [`Self::output`].
    pub async fn send_step(
        &mut self,
        step: u64,
        hidden: WireTensor<'_>,
        forward: Vec<NextHop>,
    ) -> Result<(), RemoteError> {
        let message = ClientMessage::Step {
            session: self.session,
            step,
            position: self.position,
            hidden,
            forward,
        };
        self.send(&message).await
    }

    /// The output of step `step`, of `seq` positions, sent by this client or
    /// forwarded by the previous server; and whether the server forwarded it on to
    /// the next. Replies to earlier attempts are passed over.
    pub async fn output(
        &mut self,
        seq: u32,
        step: u64,
    ) -> Result<(WireTensor<'static>, bool), RemoteError> {
        let reply = self.reply_to(step).await?;
        let output = self.hidden(reply, step)?;
        self.position += seq;
        Ok(output)
    }

    /// The next reply that is not an output of another step than `step`: an earlier
    /// attempt's output may still be on its way.
    async fn reply_to(&mut self, step: u64) -> Result<ServerMessage<'static>, RemoteError> {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let reply = tokio::time::timeout_at(deadline, self.receive())
                .await
                .map_err(|_| self.timed_out())??;
            match &reply {
                ServerMessage::Hidden { step: answered, .. } if *answered != step => {
                    tracing::debug!(
                        peer = %self.segment.peer,
                        "passing over the output of an earlier attempt at a step"
                    );
                }
                _ => return Ok(reply),
            }
        }
    }

    /// [`Self::output`], if it comes within `patience`; `None` if not, and the
    /// session can still be waited on or sent the step.
    pub async fn output_within(
        &mut self,
        seq: u32,
        step: u64,
        patience: Duration,
    ) -> Result<Option<(WireTensor<'static>, bool)>, RemoteError> {
        match tokio::time::timeout(patience, self.output(seq, step)).await {
            Ok(output) => output.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Runs past steps again, exactly as they were first sent, and returns each one's
    /// output. Rebuilds the server's cache bit for bit.
    pub async fn replay(
        &mut self,
        steps: &[WireTensor<'static>],
    ) -> Result<Vec<WireTensor<'static>>, RemoteError> {
        let step = next_step_id();
        let mut outputs = Vec::with_capacity(steps.len());
        for chunk in byte_chunks(steps, REPLAY_CHUNK_BYTES, MAX_REPLAY_STEPS) {
            let positions: u32 = chunk
                .iter()
                .map(|s| s.shape.get(1).copied().unwrap_or(0))
                .sum();
            let message = ClientMessage::Replay {
                session: self.session,
                step,
                position: self.position,
                steps: chunk.iter().map(WireTensor::view).collect(),
            };
            self.send(&message).await?;
            let reply = self.reply_to(step).await?;
            let (joined, _) = self.hidden(reply, step)?;
            outputs.extend(
                split_steps(&joined, chunk).map_err(|e| self.refused(ErrorKind::BadTensor, e))?,
            );
            self.position += positions;
        }
        Ok(outputs)
    }

    /// Starts the session over: the next replay replaces every position it holds.
    pub fn restart(&mut self) {
        self.position = 0;
    }

    /// The hidden states of a reply to step `step` at the session's next position.
    fn hidden(
        &mut self,
        reply: ServerMessage<'static>,
        step: u64,
    ) -> Result<(WireTensor<'static>, bool), RemoteError> {
        match reply {
            ServerMessage::Hidden {
                step: answered,
                position,
                hidden,
                draining,
                forwarded,
            } if position == self.position && answered == step => {
                self.draining |= draining;
                self.forward_link = forwarded.or(self.forward_link);
                Ok((hidden, forwarded.is_some()))
            }
            other => Err(self.unexpected(other)),
        }
    }

    /// Ends the session so the server frees its cache now.
    pub async fn close(mut self) {
        let close = ClientMessage::Close {
            session: self.session,
        };
        let _ = write_message(&mut self.stream, &close).await;
    }
}

fn connection(segment: &RouteSegment, reason: impl ToString) -> RemoteError {
    RemoteError::Connection {
        peer: segment.peer,
        range: segment.range,
        reason: reason.to_string(),
    }
}
