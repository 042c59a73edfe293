//! A pipeline over remote servers: one inference session per route segment, each on
//! its own long-lived stream. Each segment gets the hidden states of the previous one,
//! so servers only ever see hidden states, never tokens.
//!
//! Servers forward each output to the next server themselves when they can (the
//! protocol's forwarding), so a token crosses the network once per server plus once
//! back instead of twice per server; every output still reaches the client.
//!
//! Every step a segment was sent is kept, so when its server fails the client can
//! route around it and replay the history on the new servers, which rebuilds their
//! caches exactly; the generation continues with the same tokens ([`failover`]).

mod chunks;
mod error;
mod failover;
mod live;
mod route;
mod segment;

use allmende_protocol::inference::{ForwardLink, STEP_POSITIONS};
use candle_core::Tensor;

use crate::network::PathInfo;

pub use error::RemoteError;
pub use route::{FailoverEvent, HopCounts, RouteContext, Segment, SwarmRoute};
pub use segment::{next_step_id, SegmentSession, STEP_TIMEOUT};

pub use crate::client::routes::RouteSegment;
use live::LiveRoute;

pub struct RemotePipeline {
    runtime: tokio::runtime::Handle,
    /// Moves into each step's task and back; `None` only if a step's task was lost,
    /// or the pipeline was closed.
    route: Option<LiveRoute>,
}

impl RemotePipeline {
    /// Opens one session per segment of `route`, in order.
    pub async fn open(context: RouteContext, route: &[RouteSegment]) -> Result<Self, RemoteError> {
        Ok(Self {
            runtime: tokio::runtime::Handle::current(),
            route: Some(LiveRoute::open(context, route).await?),
        })
    }

    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.route.iter().flat_map(|r| r.segments())
    }

    pub fn route(&self) -> Vec<RouteSegment> {
        self.segments().map(|s| s.session.segment.clone()).collect()
    }

    /// For each segment of [`Self::route`], the link its server last said it handed
    /// outputs on over, to the next segment's server.
    pub fn forward_links(&self) -> Vec<Option<ForwardLink>> {
        self.segments().map(|s| s.session.forward_link).collect()
    }

    /// Servers this session moved away from.
    pub fn failovers(&self) -> &[FailoverEvent] {
        self.route.as_ref().map_or(&[], |r| r.events())
    }

    /// How the servers' inputs travelled.
    pub fn hops(&self) -> HopCounts {
        self.route
            .as_ref()
            .map_or_else(HopCounts::default, |r| r.hops())
    }

    /// The route as it stands, with the path to each server. Like [`Self::forward`],
    /// must be called from a thread outside the async runtime.
    pub fn report(&self) -> SwarmRoute {
        let segments = self.route();
        let network = self.route.as_ref().map(|r| r.network().clone());
        let paths = self.runtime.block_on(async {
            let mut paths = Vec::with_capacity(segments.len());
            for segment in &segments {
                let path: Option<PathInfo> = match &network {
                    Some(network) => network.path(segment.peer).await.ok().flatten(),
                    None => None,
                };
                paths.push(path);
            }
            paths
        });
        SwarmRoute {
            forward_links: self.forward_links(),
            failovers: self.failovers().to_vec(),
            hops: self.hops(),
            segments,
            paths,
        }
    }

    /// Closes every session so servers free their caches at once.
    pub async fn close(mut self) {
        self.end().await;
    }

    /// [`Self::close`], from a thread outside the async runtime; later steps fail.
    pub fn close_blocking(&mut self) {
        let runtime = self.runtime.clone();
        runtime.block_on(self.end());
    }

    async fn end(&mut self) {
        if let Some(route) = self.route.take() {
            route.close().await;
        }
    }

    /// Runs `hidden` (`[1, seq, hidden]`) through every server of the route, at the
    /// session's next `seq` positions. Must be called from a thread outside the async
    /// runtime (e.g. `spawn_blocking`).
    ///
    /// The step runs as a task on the runtime, beside the tasks of the connections:
    /// each server's reply wakes it on the thread that read the reply, and this thread
    /// is woken once per step instead of twice per server (each a wake-up of a
    /// sleeping thread, tens of microseconds on an idle core).
    pub fn forward(&mut self, hidden: &Tensor) -> Result<Tensor, RemoteError> {
        let tensor_err = |e: candle_core::Error| RemoteError::Tensor(e.to_string());
        // Every server accepts steps of `STEP_POSITIONS`; a longer prefill goes in
        // steps of that size, with the same results bit for bit (`tests/batching.rs`).
        let seq = hidden.dim(1).map_err(tensor_err)?;
        if seq > STEP_POSITIONS {
            let mut outputs = Vec::with_capacity(seq.div_ceil(STEP_POSITIONS));
            for start in (0..seq).step_by(STEP_POSITIONS) {
                let chunk = hidden
                    .narrow(1, start, STEP_POSITIONS.min(seq - start))
                    .map_err(tensor_err)?;
                outputs.push(self.forward_step(&chunk)?);
            }
            return Tensor::cat(&outputs, 1).map_err(tensor_err);
        }
        self.forward_step(hidden)
    }

    /// Runs one step of at most `STEP_POSITIONS` positions through the route.
    fn forward_step(&mut self, hidden: &Tensor) -> Result<Tensor, RemoteError> {
        let mut route = self
            .route
            .take()
            .ok_or_else(|| RemoteError::Lost("an earlier step did not come back".into()))?;
        let hidden = hidden.clone();
        let step = self.runtime.spawn(async move {
            let result = route.forward_async(&hidden).await;
            (route, result)
        });
        match self.runtime.block_on(step) {
            Ok((route, result)) => {
                self.route = Some(route);
                result
            }
            Err(e) => Err(RemoteError::Lost(e.to_string())),
        }
    }
}
