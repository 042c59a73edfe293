//! A pipeline runs all of a model's layers for one session. The generation loop sees
//! only this trait, so a local chain of shards and a chain of remote servers are
//! interchangeable and must give the same tokens.

use std::sync::Arc;

use candle_core::Tensor;

use super::remote::RemoteError;
use crate::model::{ForwardError, Shard, ShardCache};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error(transparent)]
    Local(#[from] ForwardError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

pub trait Pipeline {
    /// Runs every layer over `hidden` (`[1, seq, hidden]`), the next `seq` positions
    /// of this session, and returns the final hidden states.
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor, PipelineError>;
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
