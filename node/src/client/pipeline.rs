//! A pipeline runs all of a model's layers for one session. The generation loop sees
//! only this trait, so a local chain of shards and a chain of remote servers are
//! interchangeable and must give the same tokens.

use std::sync::Arc;

use candle_core::Tensor;

use super::remote::{RemoteError, RemotePipeline, SwarmRoute};
use crate::model::{ForwardError, Shard, ShardCache};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error(transparent)]
    Local(#[from] ForwardError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// Where a session's layers ran, for reports.
#[derive(Clone, Debug)]
pub enum RouteReport {
    /// Every layer in this process.
    Local,
    Swarm(SwarmRoute),
}

/// Every method blocks until it is done: call them from a thread outside the async
/// runtime (e.g. `spawn_blocking`).
pub trait Pipeline: Send {
    /// Runs every layer over `hidden` (`[1, seq, hidden]`), the next `seq` positions
    /// of this session, and returns the final hidden states.
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor, PipelineError>;

    /// Where the session's layers run now, and what moved them.
    fn report(&self) -> RouteReport {
        RouteReport::Local
    }

    /// Ends the session, so that servers free its caches now; later steps fail.
    /// Caches in this process go with the pipeline.
    fn close(&mut self) {}
}

/// Shards in this process, run in order, each with its own cache for this session.
pub struct LocalPipeline {
    stages: Vec<(Arc<Shard>, ShardCache)>,
}

impl LocalPipeline {
    /// `shards` must cover the model's layers in order without gaps.
    pub fn new(shards: Vec<Arc<Shard>>, max_len: usize) -> Self {
        let stages = shards
            .into_iter()
            .map(|s| {
                let cache = s.new_cache(max_len);
                (s, cache)
            })
            .collect();
        Self { stages }
    }
}

impl Pipeline for LocalPipeline {
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor, PipelineError> {
        let mut x = hidden.clone();
        for (shard, cache) in &mut self.stages {
            x = shard.forward(&x, cache)?;
        }
        Ok(x)
    }
}

impl Pipeline for RemotePipeline {
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor, PipelineError> {
        Ok(RemotePipeline::forward(self, hidden)?)
    }

    fn report(&self) -> RouteReport {
        RouteReport::Swarm(RemotePipeline::report(self))
    }

    fn close(&mut self) {
        self.close_blocking();
    }
}
