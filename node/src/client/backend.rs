//! Where a session's layers run: every layer in this process, or a route through the
//! swarm. A front end picks a backend once; from then on it only opens sessions, and
//! a new kind (some layers here, the rest remote) needs no front-end change.

use std::sync::Arc;

use tokio::runtime::Handle;

use super::connect::{connect, ConnectError, RouteOptions};
use super::pipeline::{LocalPipeline, Pipeline};
use super::routes::ModelTarget;
use crate::model::Shard;
use crate::network::Network;

pub trait Backend: Send + Sync {
    /// Opens a session of `max_len` positions. Blocks until it is open: call it from a
    /// thread outside the async runtime.
    fn open(&self, max_len: usize) -> Result<Box<dyn Pipeline>, ConnectError>;

    /// What runs the layers, for the user.
    fn describe(&self) -> String;
}

/// Shards loaded into this process, covering the model's layers in order.
pub struct LocalBackend {
    shards: Vec<Arc<Shard>>,
}

impl LocalBackend {
    pub fn new(shards: Vec<Arc<Shard>>) -> Self {
        Self { shards }
    }
}

impl Backend for LocalBackend {
    fn open(&self, max_len: usize) -> Result<Box<dyn Pipeline>, ConnectError> {
        Ok(Box::new(LocalPipeline::new(self.shards.clone(), max_len)))
    }

    fn describe(&self) -> String {
        "every layer in this process".into()
    }
}

/// Servers of the swarm, found anew for every session.
pub struct SwarmBackend {
    network: Network,
    target: ModelTarget,
    options: RouteOptions,
    /// The runtime the network runs on, which carries the sessions' steps.
    runtime: Handle,
}

impl SwarmBackend {
    pub fn new(
        network: Network,
        target: ModelTarget,
        options: RouteOptions,
        runtime: Handle,
    ) -> Self {
        Self {
            network,
            target,
            options,
            runtime,
        }
    }
}

impl Backend for SwarmBackend {
    fn open(&self, max_len: usize) -> Result<Box<dyn Pipeline>, ConnectError> {
        let max_len = u32::try_from(max_len).unwrap_or(u32::MAX);
        let opening = connect(&self.network, &self.target, max_len, self.options);
        Ok(Box::new(self.runtime.block_on(opening)?))
    }

    fn describe(&self) -> String {
        format!("the swarm serving {}", self.target.name)
    }
}
