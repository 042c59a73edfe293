//! The Allmende node: one binary that serves transformer layers to the swarm and
//! sends prompts to it.
//!
//! # Layout
//! - [`model`]: reading GGUF Llama models and computing a range of layers (a shard),
//!   with per-session KV caches kept outside the weights.
//! - [`client`]: what stays in the user's process: tokenizer, chat template,
//!   embedding, LM head, sampling, and the generation loop over a [`client::Pipeline`].
//! - [`network`]: the libp2p swarm (DHT, discovery, streams) behind a cloneable handle.
//! - [`server`]: serving a shard: inference sessions, the compute worker, announcements.
//! - [`routing`]: pure route planning and layer assignment over a swarm snapshot.
//! - [`weights`]: fetching a model's tensors from peers and serving them to others.
//! - [`api`]: the OpenAI-compatible HTTP API, the web page and `/metrics`.
//! - [`metrics`]: the counters and histograms a node exposes.
//! - [`cli`]: the `allmende` command line.
//! - [`paths`]: where the model cache and data live.
//!
//! Wire types and limits live in the `allmende-protocol` crate.

pub mod api;
pub mod cli;
pub mod client;
pub mod metrics;
pub mod model;
pub mod network;
pub mod paths;
pub mod routing;
pub mod server;
pub mod weights;
