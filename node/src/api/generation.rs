//! The one place the API starts a generation: a session opened through the swarm, the
//! generation run (with failover) on a blocking thread, the session closed. Everything
//! else of a request's run only sees pieces of text and the finished [`Generation`].

use std::ops::ControlFlow;

use allmende_protocol::WireDType;

use super::{ApiError, Gateway};
use crate::client::connect::{connect, RouteOptions};
use crate::client::generate::session_length;
use crate::client::{generate, Generation, GenerationParams, Piece};

/// What receives a generation's text, on the generation's own thread.
pub trait Listener: Send + 'static {
    type Output: Send + 'static;

    /// A piece of text as it is generated; `Break` ends the generation at this token.
    fn piece(&mut self, piece: Piece<'_>) -> ControlFlow<()>;

    /// The generation has ended, whole or not.
    fn end(self, generation: Result<Generation, ApiError>) -> Result<Self::Output, ApiError>;
}

/// Generates from `prompt_ids` through the swarm, giving the pieces to `listener`.
pub async fn generate_through_swarm<L: Listener>(
    gateway: &Gateway,
    prompt_ids: Vec<u32>,
    params: GenerationParams,
    mut listener: L,
) -> Result<L::Output, ApiError> {
    let max_len = session_length(&gateway.model, prompt_ids.len(), &params) as u32;
    let options = RouteOptions::new(WireDType::F32, gateway.failover_patience);
    let mut pipeline = connect(&gateway.network, &gateway.target, max_len, options)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let model = gateway.model.clone();
    let (output, pipeline) = tokio::task::spawn_blocking(move || {
        let generation = generate(&model, &mut pipeline, &prompt_ids, &params, &mut |piece| {
            listener.piece(piece)
        });
        let generation = generation.map_err(|e| ApiError::unavailable(e.to_string()));
        (listener.end(generation), pipeline)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    gateway
        .metrics
        .failovers
        .inc_by(pipeline.failovers().len() as u64);
    pipeline.close().await;
    output
}
