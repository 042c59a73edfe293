//! The one place the API starts a generation: the client's one [`Generator`] over the
//! swarm, run on a blocking thread, its session closed at the end. Everything else of
//! a request's run only sees pieces of text and the finished [`Generation`].

use std::ops::ControlFlow;
use std::sync::Arc;

use allmende_protocol::WireDType;

use super::{ApiError, Gateway};
use crate::client::backend::SwarmBackend;
use crate::client::connect::RouteOptions;
use crate::client::generate::session_length;
use crate::client::generator::Generator;
use crate::client::pipeline::RouteReport;
use crate::client::{Generation, GenerationParams, Piece};

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
    let capacity = session_length(&gateway.model, prompt_ids.len(), &params);
    let backend = SwarmBackend::new(
        gateway.network.clone(),
        gateway.target.clone(),
        RouteOptions::new(WireDType::F32, gateway.failover_patience),
        tokio::runtime::Handle::current(),
    );
    let mut generator = Generator::new(gateway.model.clone(), Arc::new(backend), capacity);
    let (output, report) = tokio::task::spawn_blocking(move || {
        let generation =
            generator.generate(&prompt_ids, &params, &mut |piece| listener.piece(piece));
        let generation = generation.map_err(|e| ApiError::unavailable(e.to_string()));
        (listener.end(generation), generator.close())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(RouteReport::Swarm(route)) = report {
        gateway
            .metrics
            .failovers
            .inc_by(route.failovers.len() as u64);
    }
    output
}
