//! What can go wrong with a session's servers, and whom it concerns.

use std::time::Duration;

use allmende_protocol::{ErrorKind, LayerRange};
use libp2p::PeerId;

use crate::routing::RouteError;

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
    #[error("server {peer} (layers {range}) did not answer within {waited:?}")]
    Silent {
        peer: PeerId,
        range: LayerRange,
        waited: Duration,
    },
    #[error("server {peer} (layers {range}) sent an unexpected reply: {reason}")]
    Protocol {
        peer: PeerId,
        range: LayerRange,
        reason: String,
    },
    #[error("{route} of model {model_name} ({model}) after losing a server: {cause}")]
    NoReplica {
        route: RouteError,
        model_name: String,
        model: String,
        cause: String,
    },
    #[error("cannot convert hidden states: {0}")]
    Tensor(String),
    /// A step's task on the async runtime ended without a result (the runtime is
    /// shutting down); the session's route went with it.
    #[error("the session's route is lost: {0}")]
    Lost(String),
}

impl RemoteError {
    /// A refusal that says the request itself is wrong: every honest server would
    /// refuse it the same way.
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self,
            RemoteError::Refused {
                kind: ErrorKind::BadRequest | ErrorKind::BadTensor | ErrorKind::TooLong,
                ..
            }
        )
    }

    /// The server this error concerns, if any.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            RemoteError::Busy { peer, .. }
            | RemoteError::Refused { peer, .. }
            | RemoteError::Connection { peer, .. }
            | RemoteError::Silent { peer, .. }
            | RemoteError::Protocol { peer, .. } => Some(*peer),
            RemoteError::NoReplica { .. } | RemoteError::Tensor(_) | RemoteError::Lost(_) => None,
        }
    }
}
