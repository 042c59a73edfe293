//! A model's weights over the swarm: a node started with only the model id fetches the
//! manifest and exactly the tensors of its layers from peers, checks every chunk, and
//! keeps them in a cache it loads from on the next start; every node serves the
//! weights it holds to others, within an upload rate.
//!
//! - [`plan`]: which tensors a shard needs and which peers to ask (pure).
//! - [`cache`]: a donor's partial copy of the model on disk.
//! - [`fetch`]: fetching the manifest and chunks, with checks and bans.
//! - [`http`]: a model's files on an HTTP server, read by range requests.
//! - [`serve`]: answering peers' weights requests.

pub mod cache;
pub mod fetch;
pub mod http;
pub mod plan;
pub mod serve;

pub use cache::Cache;
pub use serve::{Holding, WeightsServer};
