//! Serving a shard to the swarm: accepting inference streams, running sessions on the
//! compute worker, and announcing what this node serves in the DHT.

mod admission;
mod announce;
mod compute;
mod fair_queue;
mod forwarding;
pub mod guard;
mod handlers;
mod memory;
pub(crate) mod memory_limit;
pub mod memory_plan;
mod other_version;
mod reply;
mod session;
pub mod share;
mod stream;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allmende_protocol::inference::PROTOCOL_VERSION;
use allmende_protocol::{ModelId, ServerInfo};
use candle_core::{DType, Device, Tensor};
use futures::StreamExt;
use tokio::sync::{watch, Semaphore};

use admission::{SlotKind, StreamRefused};
pub use announce::{announce_loop, ANNOUNCE_INTERVAL, ANNOUNCE_TTL};
pub use compute::ComputeQueue;

use crate::metrics::Metrics;
use crate::model::Shard;
use crate::network::framing::FrameBudget;
use crate::network::Network;

/// How often freed session memory is handed back to the system.
const MEMORY_TRIM_INTERVAL: Duration = Duration::from_secs(2);
/// Bytes that frames being received may hold at once, over every stream: four of the
/// largest frames. Honest steps are far smaller (a 4,096-position prefill of a
/// 4,096-wide model is 64 MiB only in f32), and frames arrive in full at once.
const FRAME_BUDGET_BYTES: usize = 256 << 20;
/// What one group of senders (an address) may hold of it: one of the largest frames.
const FRAME_BUDGET_PER_GROUP: usize = FRAME_BUDGET_BYTES / 4;

/// Limits a server enforces on every session.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub max_sessions: usize,
    /// Most positions one session may hold.
    pub max_session_len: usize,
    /// A session with no message for this long is closed and its cache freed.
    pub idle_timeout: Duration,
    /// Bytes all sessions' KV caches may reserve together. A session reserves room
    /// for its whole maximum length when it opens, so the node never over-commits.
    pub kv_cache_bytes: u64,
    /// Most positions in one step (a prefill chunk).
    pub max_step_positions: usize,
    pub peers: guard::PeerLimits,
}

/// Everything the session handlers share.
pub struct ShardServer {
    pub shard: Arc<Shard>,
    pub model: ModelId,
    pub model_name: String,
    pub limits: ServerLimits,
    pub throughput: f32,
    /// The numerics version this server announces: its kernels' own, unless a test
    /// stands in for a server of another release.
    pub numerics_version: u32,
    pub metrics: Arc<Metrics>,
    compute: ComputeQueue,
    /// The KV-cache budget, in KiB.
    kv_budget: Arc<Semaphore>,
    /// Open streams (sessions plus probes) and sessions, shared fairly among groups
    /// of peers; a stream's slot is taken before it is served.
    shares: std::sync::Mutex<admission::Shares>,
    next_session: AtomicU64,
    /// Where steps forwarded by other servers find their sessions.
    inboxes: forwarding::Inboxes,
    /// Per-peer rate, session and ban bookkeeping; never held across an await.
    guard: std::sync::Mutex<guard::PeerGuard<libp2p::PeerId>>,
    draining: watch::Sender<bool>,
    /// Where peers reach this server, as its network last confirmed.
    addrs: std::sync::Mutex<Vec<String>>,
    /// What frames being received may hold, over every stream.
    pub frame_budget: FrameBudget,
}

impl ShardServer {
    pub fn new(
        shard: Arc<Shard>,
        model: ModelId,
        model_name: String,
        limits: ServerLimits,
        throughput: f32,
        numerics_version: u32,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let compute = ComputeQueue::start(shard.clone(), limits.max_sessions);
        let kv_kib = (limits.kv_cache_bytes / 1024).min(Semaphore::MAX_PERMITS as u64) as usize;
        Arc::new(Self {
            shard,
            model,
            model_name,
            throughput,
            numerics_version,
            metrics,
            compute,
            kv_budget: Arc::new(Semaphore::new(kv_kib)),
            frame_budget: FrameBudget::new(FRAME_BUDGET_BYTES, FRAME_BUDGET_PER_GROUP),
            shares: std::sync::Mutex::new(admission::Shares::new(limits.max_sessions)),
            next_session: AtomicU64::new(1),
            inboxes: forwarding::Inboxes::default(),
            guard: std::sync::Mutex::new(guard::PeerGuard::new(limits.peers.clone())),
            draining: watch::channel(false).0,
            addrs: Default::default(),
            limits,
        })
    }

    /// What this server serves and its current load.
    pub fn info(&self) -> ServerInfo {
        ServerInfo {
            model: self.model,
            model_name: self.model_name.clone(),
            block_count: self.shard.config().block_count as u32,
            range: self.shard.range(),
            protocol_version: PROTOCOL_VERSION,
            numerics_version: self.numerics_version,
            throughput: self.throughput,
            free_sessions: self.free_sessions() as u32,
            max_sessions: self.limits.max_sessions as u32,
            addrs: self.addrs.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            draining: self.is_draining(),
        }
    }

    pub fn set_addrs(&self, addrs: Vec<String>) {
        *self.addrs.lock().unwrap_or_else(|e| e.into_inner()) = addrs;
    }

    /// Shutting down: open sessions are still served, new ones refused.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    pub fn begin_drain(&self) {
        self.draining.send_replace(true);
    }

    /// Resolves once [`Self::begin_drain`] has been called.
    pub async fn drained(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// KV-cache bytes per position of a session over `layers` layers.
    pub fn kv_bytes_per_position(&self, layers: u32) -> u64 {
        crate::model::kv_cache::bytes_per_position_and_layer(self.shard.config().kv_size())
            * layers as u64
    }

    /// Sessions currently open.
    pub fn open_sessions(&self) -> usize {
        self.limits.max_sessions - self.free_sessions()
    }

    /// Runs `f` on the peer guard. A poisoned lock (a panic elsewhere) still holds
    /// valid bookkeeping, so it is used as is.
    pub fn guard<T>(&self, f: impl FnOnce(&mut guard::PeerGuard<libp2p::PeerId>) -> T) -> T {
        let mut guard = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Accepts inference streams until the network stops.
    pub async fn run(
        self: Arc<Self>,
        network: Network,
    ) -> Result<(), crate::network::NetworkError> {
        let mut incoming = network.accept()?;
        tokio::spawn(other_version::refuse_previous_version(network.clone()));
        let mut prune = tokio::time::interval(guard::OFFENCE_WINDOW);
        let mut trim = tokio::time::interval(MEMORY_TRIM_INTERVAL);
        loop {
            let (peer, stream) = tokio::select! {
                next = incoming.next() => match next {
                    Some(next) => next,
                    None => break,
                },
                _ = prune.tick() => {
                    self.guard(|g| g.prune(Instant::now()));
                    continue;
                }
                _ = trim.tick() => {
                    memory::trim_if_needed();
                    continue;
                }
            };
            let (group, slot) = match self.admit_stream(peer, &network) {
                Ok(admitted) => admitted,
                // Dropped unanswered.
                Err(StreamRefused::Banned) => continue,
                Err(StreamRefused::Busy(why)) => {
                    tracing::debug!(%peer, "refusing a stream: {why:?}");
                    // Said, not just dropped: a client that hears `Busy` waits its
                    // turn, while a stream that ends looks like a failed server.
                    let reason = why.reason(SlotKind::Stream, self.limits.max_sessions);
                    tokio::spawn(stream::say_busy(stream, reason));
                    continue;
                }
            };
            let (server, network) = (self.clone(), network.clone());
            tokio::spawn(async move {
                stream::serve_stream(server, network, peer, group, stream).await;
                drop(slot);
            });
        }
        Ok(())
    }
}

/// Decode tokens/s of one session through all of `shard`'s layers, measured on a few
/// steps of synthetic hidden states: the figure announced for routing.
pub fn measure_throughput(shard: &Shard) -> f32 {
    const STEPS: usize = 8;
    let hidden_size = shard.config().hidden_size;
    let run = || -> Result<f32, crate::model::ForwardError> {
        let mut cache = shard.new_cache(STEPS + 1);
        let x =
            Tensor::randn(0f32, 1.0, (1, 1, hidden_size), &Device::Cpu)?.to_dtype(DType::F32)?;
        shard.forward(&x, &mut cache)?; // warm-up
        let start = Instant::now();
        for _ in 0..STEPS {
            shard.forward(&x, &mut cache)?;
        }
        Ok(STEPS as f32 / start.elapsed().as_secs_f32().max(1e-6))
    };
    run().unwrap_or_else(|e| {
        tracing::warn!("cannot measure throughput: {e}");
        0.0
    })
}
