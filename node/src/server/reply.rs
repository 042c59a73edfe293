//! What a stream answers a message with, and its encoding into a frame.

use allmende_protocol::inference::ForwardLink;
use allmende_protocol::{encode_frame, ErrorKind, ServerMessage, WireDType, WireTensor};
use candle_core::Tensor;

use crate::model::{candle_message, with_values};
use crate::network::framing::INLINE_CODEC_BYTES;

/// A message refused, with the kind of error and why: answered as an `Error`.
pub type Refusal = (ErrorKind, String);

/// What the server answers a request with.
pub enum Reply {
    Message(ServerMessage<'static>),
    /// A step's output, sent as hidden states in the session's wire type.
    Hidden {
        step: u64,
        position: u32,
        output: Tensor,
        dtype: WireDType,
        draining: bool,
        /// The output also went on to the next server of the route, over this link.
        forwarded: Option<ForwardLink>,
    },
}

impl Reply {
    /// Whether the reply shows the stream's session making progress (opening or
    /// computing), which keeps an idle stream open.
    pub fn is_progress(&self) -> bool {
        match self {
            Reply::Hidden { .. } => true,
            Reply::Message(m) => matches!(m, ServerMessage::Opened { .. }),
        }
    }

    /// The reply as a frame. An output's values are encoded straight from the
    /// tensor's memory: their one copy on the way out.
    fn frame(self) -> Result<Vec<u8>, Refusal> {
        let internal = |e: String| (ErrorKind::Internal, e);
        match self {
            Reply::Message(message) => encode_frame(&message).map_err(|e| internal(e.to_string())),
            Reply::Hidden {
                step,
                position,
                output,
                dtype,
                draining,
                forwarded,
            } => {
                let dims: Vec<u32> = output.dims().iter().map(|&d| d as u32).collect();
                let frame = with_values(&output, |values| {
                    let hidden =
                        WireTensor::new(&dims, values, dtype).map_err(|e| e.to_string())?;
                    let message = ServerMessage::Hidden {
                        step,
                        position,
                        hidden,
                        draining,
                        forwarded,
                    };
                    encode_frame(&message).map_err(|e| e.to_string())
                });
                frame
                    .map_err(|e| internal(candle_message(&e)))?
                    .map_err(internal)
            }
        }
    }

    /// The reply as a frame: encoded inline when small, else on a blocking thread.
    async fn encode(self) -> Result<Vec<u8>, Refusal> {
        let bytes = match &self {
            Reply::Hidden { output, .. } => output.elem_count() * 4,
            Reply::Message(_) => 0,
        };
        if bytes <= INLINE_CODEC_BYTES {
            return self.frame();
        }
        tokio::task::spawn_blocking(move || self.frame())
            .await
            .map_err(|e| (ErrorKind::Internal, e.to_string()))?
    }
}

/// The frame answering a message: its reply, or the `Error` for its refusal.
pub async fn frame_of(reply: Result<Reply, Refusal>) -> Result<Vec<u8>, String> {
    let refusal = match reply {
        Ok(reply) => match reply.encode().await {
            Ok(frame) => return Ok(frame),
            Err(refusal) => refusal,
        },
        Err(refusal) => refusal,
    };
    let (kind, message) = refusal;
    encode_frame(&error(kind, message)).map_err(|e| e.to_string())
}

/// The `Error` message for a refusal, its reason cut to the protocol's length.
pub fn error(kind: ErrorKind, message: String) -> ServerMessage<'static> {
    let message = allmende_protocol::inference::cut_reason(message);
    ServerMessage::Error { kind, message }
}
