//! A pipeline over remote servers: one inference session per route segment, each on
//! its own long-lived stream. The client sends each segment the hidden states of the
//! previous one, so servers only ever see hidden states, never tokens.

use std::time::Duration;

use allmende_protocol::{
    ClientMessage, ErrorKind, LayerRange, ModelId, ServerMessage, WireDType, WireTensor,
};
use candle_core::{Device, Tensor};
use libp2p::{PeerId, Stream};
use serde::Serialize;

use super::pipeline::{Pipeline, PipelineError};
use crate::network::framing::{read_message, write_message, FrameIoError};
use crate::network::Network;

/// Longest wait for one server's reply to one step. A long prefill on a slow server
/// is the worst case; a dead server is usually noticed much sooner, by the connection.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// One segment of a route: a server and the layers it runs for this session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteSegment {
    #[serde(serialize_with = "display")]
    pub peer: PeerId,
    pub range: LayerRange,
}

fn display<S: serde::Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(peer)
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    #[error("server {peer} (layers {range}) is busy: {reason}")]
    Busy {
        peer: PeerId,
        range: LayerRange,
        reason: String,
    },
    #[error("server {peer} (layers {range}) refused: {message} ({kind:?})")]
    Refused {
        peer: PeerId,
        range: LayerRange,
        kind: ErrorKind,
        message: String,
    },
    #[error("lost server {peer} (layers {range}): {reason}")]
    Connection {
        peer: PeerId,
        range: LayerRange,
        reason: String,
    },
    #[error("server {peer} (layers {range}) sent an unexpected reply: {reason}")]
    Protocol {
        peer: PeerId,
        range: LayerRange,
        reason: String,
    },
    #[error("cannot convert hidden states: {0}")]
    Tensor(String),
}

impl RemoteError {
    /// The server this error concerns, if any.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            RemoteError::Busy { peer, .. }
            | RemoteError::Refused { peer, .. }
            | RemoteError::Connection { peer, .. }
            | RemoteError::Protocol { peer, .. } => Some(*peer),
            RemoteError::Tensor(_) => None,
        }
    }
}

struct SegmentSession {
    segment: RouteSegment,
    stream: Stream,
    session: u64,
    position: u32,
}

impl SegmentSession {
    fn error(&self, reason: impl ToString) -> RemoteError {
        RemoteError::Connection {
            peer: self.segment.peer,
            range: self.segment.range,
            reason: reason.to_string(),
        }
    }

    async fn exchange(&mut self, message: &ClientMessage) -> Result<ServerMessage, RemoteError> {
        let io = async {
            write_message(&mut self.stream, message).await?;
            read_message::<ServerMessage, _>(&mut self.stream).await
        };
        match tokio::time::timeout(STEP_TIMEOUT, io).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(FrameIoError::Closed)) => Err(self.error("the server closed the session")),
            Ok(Err(e)) => Err(self.error(e)),
            Err(_) => Err(self.error(format!("no reply within {STEP_TIMEOUT:?}"))),
        }
    }

    async fn step(&mut self, hidden: WireTensor) -> Result<WireTensor, RemoteError> {
        let seq = hidden.shape.get(1).copied().unwrap_or(0);
        let message = ClientMessage::Step {
            session: self.session,
            position: self.position,
            hidden,
        };
        let (peer, range) = (self.segment.peer, self.segment.range);
        match self.exchange(&message).await? {
            ServerMessage::Hidden { position, hidden } if position == self.position => {
                self.position += seq;
                Ok(hidden)
            }
            ServerMessage::Error { kind, message } => Err(RemoteError::Refused {
                peer,
                range,
                kind,
                message,
            }),
            other => Err(RemoteError::Protocol {
                peer,
                range,
                reason: format!("{other:?}").chars().take(200).collect(),
            }),
        }
    }
}

/// Opens a session on `segment`'s server.
async fn open_segment(
    network: &Network,
    model: ModelId,
    segment: RouteSegment,
    max_len: u32,
    dtype: WireDType,
) -> Result<SegmentSession, RemoteError> {
    let (peer, range) = (segment.peer, segment.range);
    let stream = network
        .open_stream(peer)
        .await
        .map_err(|e| RemoteError::Connection {
            peer,
            range,
            reason: e.to_string(),
        })?;
    let mut session = SegmentSession {
        segment,
        stream,
        session: 0,
        position: 0,
    };
    let open = ClientMessage::Open {
        model,
        range,
        max_len,
        dtype,
    };
    match session.exchange(&open).await? {
        ServerMessage::Opened {
            session: id,
            max_len: granted,
        } if granted >= max_len => {
            session.session = id;
            Ok(session)
        }
        ServerMessage::Opened {
            max_len: granted, ..
        } => Err(RemoteError::Refused {
            peer,
            range,
            kind: ErrorKind::TooLong,
            message: format!("server allows {granted} positions, {max_len} needed"),
        }),
        ServerMessage::Busy { reason } => Err(RemoteError::Busy {
            peer,
            range,
            reason,
        }),
        ServerMessage::Error { kind, message } => Err(RemoteError::Refused {
            peer,
            range,
            kind,
            message,
        }),
        other => Err(RemoteError::Protocol {
            peer,
            range,
            reason: format!("{other:?}").chars().take(200).collect(),
        }),
    }
}

pub struct RemotePipeline {
    runtime: tokio::runtime::Handle,
    sessions: Vec<SegmentSession>,
    dtype: WireDType,
}

impl RemotePipeline {
    /// Opens one session per segment of `route`, in order.
    pub async fn open(
        network: &Network,
        model: ModelId,
        route: &[RouteSegment],
        max_len: u32,
        dtype: WireDType,
    ) -> Result<Self, RemoteError> {
        let mut sessions = Vec::with_capacity(route.len());
        for segment in route {
            sessions.push(open_segment(network, model, segment.clone(), max_len, dtype).await?);
        }
        Ok(Self {
            runtime: tokio::runtime::Handle::current(),
            sessions,
            dtype,
        })
    }

    pub fn route(&self) -> Vec<RouteSegment> {
        self.sessions.iter().map(|s| s.segment.clone()).collect()
    }

    async fn forward_async(&mut self, hidden: &Tensor) -> Result<Tensor, RemoteError> {
        let dims: Vec<u32> = hidden.dims().iter().map(|&d| d as u32).collect();
        let local = RemoteError::Tensor;
        let values = hidden
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| local(e.to_string()))?;
        let mut wire =
            WireTensor::from_f32(&dims, &values, self.dtype).map_err(|e| local(e.to_string()))?;
        for session in &mut self.sessions {
            wire = session.step(wire).await?;
            if wire.shape != dims {
                return Err(RemoteError::Protocol {
                    peer: session.segment.peer,
                    range: session.segment.range,
                    reason: format!("returned shape {:?} for input {dims:?}", wire.shape),
                });
            }
        }
        let values = wire.to_f32().map_err(|e| local(e.to_string()))?;
        let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).map_err(|e| local(e.to_string()))
    }

    /// Closes every session so servers free their caches at once.
    pub async fn close(mut self) {
        for s in &mut self.sessions {
            let close = ClientMessage::Close { session: s.session };
            let _ = write_message(&mut s.stream, &close).await;
        }
    }
}

impl Pipeline for RemotePipeline {
    /// Must be called from a thread outside the async runtime (e.g. `spawn_blocking`).
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor, PipelineError> {
        let runtime = self.runtime.clone();
        Ok(runtime.block_on(self.forward_async(hidden))?)
    }
}
