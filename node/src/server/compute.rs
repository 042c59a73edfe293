//! The compute worker: a dedicated thread that runs shard forwards, fed by a bounded
//! queue, so candle's compute never runs on (or blocks) the async runtime.
//!
//! A job carries its session's cache in and out by value: no lock is held across an
//! await, and the worker needs no table of sessions.

use std::sync::Arc;

use candle_core::Tensor;
use tokio::sync::{mpsc, oneshot};

use crate::model::{ForwardError, Shard, ShardCache};

pub struct ComputeJob {
    pub hidden: Tensor,
    pub cache: ShardCache,
    pub reply: oneshot::Sender<(ShardCache, Result<Tensor, ForwardError>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("the compute worker has stopped")]
pub struct WorkerStopped;

#[derive(Clone)]
pub struct ComputeQueue {
    jobs: mpsc::Sender<ComputeJob>,
}

impl ComputeQueue {
    /// Starts the worker thread. `capacity` bounds queued jobs: with one step in flight
    /// per session, the session limit is the natural size.
    pub fn start(shard: Arc<Shard>, capacity: usize) -> Self {
        let (jobs, mut receiver) = mpsc::channel::<ComputeJob>(capacity.max(1));
        std::thread::Builder::new()
            .name("allmende-compute".into())
            .spawn(move || {
                while let Some(mut job) = receiver.blocking_recv() {
                    let output = shard.forward(&job.hidden, &mut job.cache);
                    // The session may have gone away meanwhile; its cache is dropped here.
                    let _ = job.reply.send((job.cache, output));
                }
            })
            .map_or_else(
                |e| tracing::error!("cannot start the compute thread: {e}"),
                |_| (),
            );
        Self { jobs }
    }

    /// Runs `hidden` through the session's layers; returns the cache with the result.
    pub async fn run(
        &self,
        hidden: Tensor,
        cache: ShardCache,
    ) -> Result<(ShardCache, Result<Tensor, ForwardError>), WorkerStopped> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(ComputeJob {
                hidden,
                cache,
                reply,
            })
            .await
            .map_err(|_| WorkerStopped)?;
        result.await.map_err(|_| WorkerStopped)
    }
}
