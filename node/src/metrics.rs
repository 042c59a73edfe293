//! Counters and histograms a node exposes at `GET /metrics`, in Prometheus' text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    /// Server side: steps computed for remote sessions, and the positions they held.
    pub steps: Counter,
    pub positions: Counter,
    pub sessions_opened: Counter,
    pub busy_refusals: Counter,
    /// Seconds a step spends on the compute worker.
    pub step_seconds: Histogram,
    /// Outputs sent straight on to the next server of a route, and forwarded steps
    /// from other servers that named no open session here or a wrong token.
    pub steps_forwarded: Counter,
    pub forwards_refused: Counter,
    /// Streams closed because a frame arrived slower than any honest link sends.
    pub slow_frames: Counter,
    /// Client side (gateway): API requests served, tokens generated, servers lost.
    pub requests: Counter,
    pub tokens_generated: Counter,
    pub failovers: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("allmende");
        let m = Self {
            steps: Counter::default(),
            positions: Counter::default(),
            sessions_opened: Counter::default(),
            busy_refusals: Counter::default(),
            // 0.5 ms .. ~16 s.
            step_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            steps_forwarded: Counter::default(),
            forwards_refused: Counter::default(),
            slow_frames: Counter::default(),
            requests: Counter::default(),
            tokens_generated: Counter::default(),
            failovers: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "steps",
            "Steps computed for remote sessions",
            m.steps.clone(),
        );
        registry.register(
            "positions",
            "Positions computed for remote sessions",
            m.positions.clone(),
        );
        registry.register(
            "sessions_opened",
            "Inference sessions opened",
            m.sessions_opened.clone(),
        );
        registry.register(
            "busy_refusals",
            "Sessions refused because the node was full",
            m.busy_refusals.clone(),
        );
        registry.register(
            "step_seconds",
            "Compute time of one step on this node",
            m.step_seconds.clone(),
        );
        registry.register(
            "steps_forwarded",
            "Outputs sent straight on to the next server of a route",
            m.steps_forwarded.clone(),
        );
        registry.register(
            "forwards_refused",
            "Forwarded steps that named no open session here or a wrong token",
            m.forwards_refused.clone(),
        );
        registry.register(
            "slow_frames",
            "Streams closed because a frame arrived too slowly",
            m.slow_frames.clone(),
        );
        registry.register(
            "api_requests",
            "Completion requests served by the API",
            m.requests.clone(),
        );
        registry.register(
            "tokens_generated",
            "Tokens generated for API requests",
            m.tokens_generated.clone(),
        );
        registry.register(
            "failovers",
            "Servers a generation moved away from",
            m.failovers.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
