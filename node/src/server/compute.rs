//! The compute worker: a dedicated thread that runs shard forwards, fed by a bounded
//! queue, so candle's compute never runs on (or blocks) the async runtime. The
//! forward's parallel parts spread from it over the compute threads.
//!
//! Continuous batching: whenever the worker takes a job it also takes every job that
//! is already waiting (up to [`MAX_BATCH`]) and runs the steps of different sessions
//! as one forward, each with its own cache ([`Shard::forward_batch`]). Every weight
//! is then read once for all of them, which is what decode time is spent on. Results
//! are bit-identical to running each step alone.
//!
//! A job carries its session's cache in and out by value: no lock is held across an
//! await, and the worker needs no table of sessions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::fair_queue::FairQueue;
use super::share::PeerGroup;
use crate::model::{ForwardError, Shard, ShardCache};

/// Longest wait for the steps of sessions that stepped together last time.
const GATHER_WINDOW: Duration = Duration::from_millis(2);
/// How often to look for them meanwhile.
const GATHER_POLL: Duration = Duration::from_micros(50);

/// Most jobs run as one batch.
pub const MAX_BATCH: usize = 32;
/// Most positions in one batch: a long prefill waits for the next round rather than
/// delaying many decode steps (unless it comes first).
const MAX_BATCH_POSITIONS: usize = 512;

pub struct ComputeJob {
    /// Whose share of the compute the step counts in.
    pub group: PeerGroup,
    pub hidden: Tensor,
    pub cache: ShardCache,
    pub reply: oneshot::Sender<(ShardCache, Result<Tensor, ForwardError>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("the step's compute failed, and the session with it")]
pub struct WorkerStopped;

#[derive(Clone)]
pub struct ComputeQueue {
    jobs: mpsc::Sender<ComputeJob>,
}

/// Whether to wait for more steps before computing: while fewer have arrived than the
/// previous batch held, for at most [`GATHER_WINDOW`]. Sessions stepping together send
/// their next steps a network round trip after their replies, at slightly different
/// times; without waiting, the first to arrive would run alone and the sessions would
/// split into alternating smaller batches. When a session ends, one batch waits the
/// window out and the next expects one step fewer.
pub fn keep_gathering(collected: usize, last_batch: usize, waited: Duration) -> bool {
    collected < last_batch && waited < GATHER_WINDOW
}

fn positions_of(job: &ComputeJob) -> usize {
    job.hidden.dims().get(1).copied().unwrap_or(0)
}

/// Runs `jobs`: those that can share a forward together, the rest one by one; a job
/// with bad input gets its own error and does not affect the others.
fn run_batch(shard: &Shard, jobs: Vec<ComputeJob>) {
    let mut groups: Vec<Vec<ComputeJob>> = Vec::new();
    for job in jobs {
        if let Err(e) = shard.check(&job.hidden, &job.cache) {
            let _ = job.reply.send((job.cache, Err(e)));
            continue;
        }
        // Steps carry one sequence each (the session handler refuses others).
        let group = groups
            .iter_mut()
            .find(|g| Shard::can_batch(&g[0].cache, &job.cache));
        match group {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    for group in groups {
        let (mut hiddens, mut caches, mut replies) = (vec![], vec![], vec![]);
        for job in group {
            hiddens.push(job.hidden);
            caches.push(job.cache);
            replies.push(job.reply);
        }
        let mut refs: Vec<(&Tensor, &mut ShardCache)> =
            hiddens.iter().zip(caches.iter_mut()).collect();
        let outputs = shard.forward_batch(&mut refs);
        drop(refs);
        match outputs {
            Ok(outputs) => {
                for ((cache, reply), output) in caches.into_iter().zip(replies).zip(outputs) {
                    // The session may have gone away; its cache is dropped here.
                    let _ = reply.send((cache, Ok(output)));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (cache, reply) in caches.into_iter().zip(replies) {
                    let error = candle_core::Error::Msg(message.clone());
                    let _ = reply.send((cache, Err(ForwardError::Candle(error))));
                }
            }
        }
    }
}

/// The worker's loop: takes a job and every job already waiting, runs them with
/// `run`, until every sender is gone. A batch that panics loses its jobs (their
/// sessions get an error and their caches are gone) and the worker goes on with the
/// next: a node that announces itself keeps computing.
fn work(mut run: impl FnMut(Vec<ComputeJob>), mut receiver: mpsc::Receiver<ComputeJob>) {
    let mut waiting: Vec<ComputeJob> = Vec::new();
    let mut fair = FairQueue::default();
    let mut last_batch = 1;
    loop {
        if waiting.is_empty() {
            match receiver.blocking_recv() {
                Some(job) => waiting.push(job),
                None => return,
            }
        }
        let started = Instant::now();
        while waiting.len() < MAX_BATCH * 4 {
            match receiver.try_recv() {
                Ok(job) => waiting.push(job),
                Err(TryRecvError::Empty)
                    if keep_gathering(waiting.len(), last_batch, started.elapsed()) =>
                {
                    std::thread::sleep(GATHER_POLL);
                }
                Err(_) => break,
            }
        }
        let order: Vec<(PeerGroup, usize, u64)> = waiting
            .iter()
            .map(|j| {
                let positions = positions_of(j);
                let work = positions as u64 * j.cache.range().len() as u64;
                (j.group, positions, work)
            })
            .collect();
        let mut chosen = fair.choose(&order, MAX_BATCH, MAX_BATCH_POSITIONS);
        // Taken out from the back, so the indices still to take stay valid.
        chosen.sort_unstable();
        let mut jobs: Vec<ComputeJob> = chosen.iter().rev().map(|&i| waiting.remove(i)).collect();
        jobs.reverse();
        last_batch = jobs.len();
        let positions: usize = jobs.iter().map(positions_of).sum();
        tracing::debug!(jobs = jobs.len(), positions, "compute batch");
        let batch = std::panic::AssertUnwindSafe(|| run(jobs));
        if std::panic::catch_unwind(batch).is_err() {
            tracing::error!("a compute batch panicked; its sessions get an error");
        }
    }
}

impl ComputeQueue {
    /// Starts the worker on a thread of its own. `capacity` bounds queued jobs: with
    /// one step in flight per session, the session limit is the natural size.
    pub fn start(shard: Arc<Shard>, capacity: usize) -> Self {
        Self::start_with(capacity, move |jobs| run_batch(&shard, jobs))
    }

    fn start_with(capacity: usize, run: impl FnMut(Vec<ComputeJob>) + Send + 'static) -> Self {
        let (jobs, receiver) = mpsc::channel::<ComputeJob>(capacity.max(1));
        let worker = std::thread::Builder::new()
            .name("allmende-compute".into())
            .spawn(move || work(run, receiver));
        if let Err(e) = worker {
            tracing::error!("cannot start the compute thread: {e}");
        }
        Self { jobs }
    }

    /// Runs `hidden` through the session's layers; returns the cache with the result.
    pub async fn run(
        &self,
        group: PeerGroup,
        hidden: Tensor,
        cache: ShardCache,
    ) -> Result<(ShardCache, Result<Tensor, ForwardError>), WorkerStopped> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(ComputeJob {
                group,
                hidden,
                cache,
                reply,
            })
            .await
            .map_err(|_| WorkerStopped)?;
        result.await.map_err(|_| WorkerStopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_until_last_batch_size_or_window() {
        let short = Duration::from_micros(300);
        // One session: never waits.
        assert!(!keep_gathering(1, 1, Duration::ZERO));
        // Eight stepped together: wait for the rest, but not past the window.
        assert!(keep_gathering(3, 8, short));
        assert!(!keep_gathering(8, 8, short));
        assert!(!keep_gathering(3, 8, GATHER_WINDOW));
    }

    #[tokio::test]
    async fn a_panicking_batch_does_not_stop_the_worker() {
        use allmende_protocol::LayerRange;
        let queue = ComputeQueue::start_with(4, |jobs: Vec<ComputeJob>| {
            for job in jobs {
                let poison = job.hidden.dims()[1] == 2;
                assert!(!poison, "a bug in the forward");
                let _ = job.reply.send((job.cache, Ok(job.hidden)));
            }
        });
        let cache = || ShardCache::new(LayerRange::new(0, 1), 8);
        let hidden = |n| {
            Tensor::zeros(
                (1, n, 4),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap()
        };
        let group = PeerGroup::Net(1);
        assert!(queue.run(group, hidden(2), cache()).await.is_err());
        let (_, out) = queue
            .run(group, hidden(1), cache())
            .await
            .expect("the worker goes on");
        assert_eq!(out.unwrap().dims(), &[1, 1, 4]);
    }
}
