//! One inference stream: at most one session, driven by the client's messages.
//!
//! Every failure a peer can cause ends in an `Error` reply or a closed stream, never a
//! panic, and never touches other sessions: bad frames close this stream, bad steps are
//! refused and the session stays usable, and an idle or vanished client's cache is
//! dropped with the stream.

use std::sync::Arc;

use allmende_protocol::{
    ClientMessage, ErrorKind, LayerRange, ModelId, ServerMessage, WireDType, WireTensor,
};
use candle_core::{Device, Tensor};
use libp2p::{PeerId, Stream};
use tokio::sync::OwnedSemaphorePermit;

use super::ShardServer;
use crate::model::{ForwardError, ShardCache};
use crate::network::framing::{read_message, write_message, FrameIoError};

struct OpenSession {
    id: u64,
    dtype: WireDType,
    /// `None` only while a step is on the compute worker.
    cache: Option<ShardCache>,
    _permit: OwnedSemaphorePermit,
}

type Reply = Result<ServerMessage, (ErrorKind, String)>;

pub async fn serve_stream(server: Arc<ShardServer>, peer: PeerId, mut stream: Stream) {
    let mut session: Option<OpenSession> = None;
    loop {
        let read = tokio::time::timeout(server.limits.idle_timeout, read_message(&mut stream));
        let message: ClientMessage = match read.await {
            Err(_) => {
                tracing::debug!(%peer, "session idle for {:?}; closing", server.limits.idle_timeout);
                break;
            }
            Ok(Err(FrameIoError::Closed)) => break,
            Ok(Err(FrameIoError::Io(e))) => {
                tracing::debug!(%peer, "stream error: {e}");
                break;
            }
            Ok(Err(e)) => {
                // Oversized or undecodable frame: say why, then close the stream.
                tracing::info!(%peer, "bad frame: {e}");
                let reply = error(ErrorKind::BadRequest, e.to_string());
                let _ = write_message(&mut stream, &reply).await;
                break;
            }
            Ok(Ok(message)) => message,
        };
        let reply = match message {
            ClientMessage::Info => Ok(ServerMessage::Info(server.info())),
            ClientMessage::Open {
                model,
                range,
                max_len,
                dtype,
            } => open(&server, &mut session, model, range, max_len, dtype),
            ClientMessage::Step {
                session: id,
                position,
                hidden,
            } => step(&server, &mut session, id, position, hidden).await,
            ClientMessage::Close { session: id } => {
                if session.as_ref().is_some_and(|s| s.id == id) {
                    session = None;
                    continue;
                }
                Err((
                    ErrorKind::UnknownSession,
                    format!("no session {id} on this stream"),
                ))
            }
        };
        let reply = reply.unwrap_or_else(|(kind, message)| error(kind, message));
        if let Err(e) = write_message(&mut stream, &reply).await {
            tracing::debug!(%peer, "cannot reply: {e}");
            break;
        }
    }
}

fn error(kind: ErrorKind, message: String) -> ServerMessage {
    ServerMessage::Error { kind, message }
}

fn open(
    server: &ShardServer,
    session: &mut Option<OpenSession>,
    model: ModelId,
    range: LayerRange,
    max_len: u32,
    dtype: WireDType,
) -> Reply {
    if session.is_some() {
        return Err((
            ErrorKind::BadRequest,
            "a session is already open on this stream".into(),
        ));
    }
    if server.is_shutting_down() {
        return Err((
            ErrorKind::ShuttingDown,
            "this server is shutting down".into(),
        ));
    }
    if model != server.model {
        return Err((
            ErrorKind::WrongModel,
            format!("this server serves model {}", server.model.short()),
        ));
    }
    let max_len = (max_len as usize).min(server.limits.max_session_len);
    if max_len == 0 {
        return Err((ErrorKind::BadRequest, "max_len must be positive".into()));
    }
    let Some(cache) = server.shard.new_cache_for(range, max_len) else {
        return Err((
            ErrorKind::WrongModel,
            format!(
                "layers {range} are not within this server's {}",
                server.shard.range()
            ),
        ));
    };
    let Ok(permit) = server.sessions.clone().try_acquire_owned() else {
        return Ok(ServerMessage::Busy {
            reason: format!("all {} sessions are in use", server.limits.max_sessions),
        });
    };
    let id = server
        .next_session
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let max_len = cache.max_len() as u32;
    *session = Some(OpenSession {
        id,
        dtype,
        cache: Some(cache),
        _permit: permit,
    });
    Ok(ServerMessage::Opened {
        session: id,
        max_len,
    })
}

async fn step(
    server: &ShardServer,
    session: &mut Option<OpenSession>,
    id: u64,
    position: u32,
    hidden: WireTensor,
) -> Reply {
    let Some(open) = session.as_mut().filter(|s| s.id == id) else {
        return Err((
            ErrorKind::UnknownSession,
            format!("no session {id} on this stream"),
        ));
    };
    let Some(cache) = open.cache.take() else {
        return Err((ErrorKind::Internal, "session lost its cache".into()));
    };
    let (cache, result) = run_step(server, cache, position, &hidden).await;
    open.cache = cache;
    let output = result?;
    let dims: Vec<u32> = output.dims().iter().map(|&d| d as u32).collect();
    let values = output
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
    let hidden = WireTensor::from_f32(&dims, &values, open.dtype)
        .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
    Ok(ServerMessage::Hidden { position, hidden })
}

/// Validates a step's tensor against the session, then computes it. Always hands the
/// cache back, so a refused step leaves the session usable.
async fn run_step(
    server: &ShardServer,
    cache: ShardCache,
    position: u32,
    hidden: &WireTensor,
) -> (Option<ShardCache>, Result<Tensor, (ErrorKind, String)>) {
    let hidden_size = server.shard.config().hidden_size;
    let shape_ok = matches!(hidden.shape.as_slice(), &[b, s, h] if b > 0 && s > 0 && h as usize == hidden_size);
    if !shape_ok {
        let msg = format!(
            "hidden states have shape {:?}; expected [batch, seq, {hidden_size}]",
            hidden.shape
        );
        return (Some(cache), Err((ErrorKind::BadTensor, msg)));
    }
    if position as usize != cache.len() {
        let msg = format!(
            "step at position {position}, but the session has {} positions",
            cache.len()
        );
        return (Some(cache), Err((ErrorKind::BadRequest, msg)));
    }
    let seq = hidden.shape[1] as usize;
    if cache.len() + seq > cache.max_len() {
        let msg = format!(
            "{} more positions would exceed the session's maximum of {}",
            seq,
            cache.max_len()
        );
        return (Some(cache), Err((ErrorKind::TooLong, msg)));
    }
    let values = match hidden.to_f32() {
        Ok(v) => v,
        Err(e) => return (Some(cache), Err((ErrorKind::BadTensor, e.to_string()))),
    };
    let dims: Vec<usize> = hidden.shape.iter().map(|&d| d as usize).collect();
    let tensor = match Tensor::from_vec(values, dims, &Device::Cpu) {
        Ok(t) => t,
        Err(e) => return (Some(cache), Err((ErrorKind::BadTensor, e.to_string()))),
    };
    match server.compute.run(tensor, cache).await {
        Ok((cache, Ok(out))) => (Some(cache), Ok(out)),
        Ok((cache, Err(e))) => {
            let kind = match e {
                ForwardError::ContextFull { .. } => ErrorKind::TooLong,
                ForwardError::Shape { .. } | ForwardError::Batch { .. } => ErrorKind::BadTensor,
                _ => ErrorKind::Internal,
            };
            (Some(cache), Err((kind, e.to_string())))
        }
        Err(e) => (None, Err((ErrorKind::Internal, e.to_string()))),
    }
}
