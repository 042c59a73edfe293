//! What `generate` and `chat` share: the sampling flags, how a swarm session carries
//! its steps, and the backend their layers run on (all of them loaded here with
//! `--local`, or the swarm's).

use std::sync::Arc;

use allmende_protocol::{LayerRange, WireDType};
use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio::runtime::Runtime;

use super::swarm::{join_as_client, model_target, SwarmArgs};
use crate::client::connect::RouteOptions;
use crate::client::{
    Backend, ClientModel, GenerationParams, LocalBackend, SamplingParams, SwarmBackend,
};
use crate::model::{GgufFile, Shard};

/// Sampling flags, shared by `generate` and `chat`.
#[derive(Args, Debug)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only from the K most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample only from the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed for sampling [default: drawn at random, and reported with --json].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The generation parameters these flags ask for, checked.
    pub fn params(&self, ignore_eos: bool) -> anyhow::Result<GenerationParams> {
        let params = GenerationParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed.unwrap_or_else(rand::random),
            },
            ignore_eos,
            logprobs: None,
        };
        params.sampling.validate()?;
        Ok(params)
    }
}

/// How a swarm session carries its steps, shared by `generate` and `chat`.
#[derive(Args, Debug)]
pub struct RouteArgs {
    /// Seconds to look for other servers when one fails mid-generation, before giving
    /// up with the layers that have no server.
    #[arg(long, default_value_t = 20)]
    failover_timeout: u64,
    /// Element type of hidden states sent to servers.
    #[arg(long, value_enum, default_value_t = WireType::F32)]
    wire_dtype: WireType,
    /// Relay every server's output to the next server through this client, instead
    /// of letting servers forward it to each other (one network hop more per server
    /// and token; for servers that cannot reach each other, which are also detected
    /// and relayed around without this flag).
    #[arg(long)]
    no_forward: bool,
}

impl RouteArgs {
    pub fn options(&self) -> RouteOptions {
        let patience = std::time::Duration::from_secs(self.failover_timeout);
        RouteOptions {
            forward: !self.no_forward,
            ..RouteOptions::new(self.wire_dtype.into(), patience)
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WireType {
    F32,
    F16,
    Bf16,
}

impl From<WireType> for WireDType {
    fn from(t: WireType) -> Self {
        match t {
            WireType::F32 => WireDType::F32,
            WireType::F16 => WireDType::F16,
            WireType::Bf16 => WireDType::BF16,
        }
    }
}

/// Every layer of `model`, loaded from `gguf` into this process.
pub fn local_backend(gguf: &mut GgufFile, model: &ClientModel) -> anyhow::Result<Arc<dyn Backend>> {
    let all_layers = LayerRange::new(0, model.config.block_count as u32);
    let bar = super::loading_bar("loading layers");
    let shard = Shard::from_gguf(gguf, model.config.clone(), all_layers, &bar)
        .with_context(|| format!("loading {}", gguf.path().display()))?;
    bar.finish_and_clear();
    Ok(Arc::new(LocalBackend::new(vec![Arc::new(shard)])))
}

/// The swarm's servers of `gguf`'s model, joined as a client on `runtime`.
pub fn swarm_backend(
    gguf: &GgufFile,
    model: &ClientModel,
    swarm: &SwarmArgs,
    route: &RouteArgs,
    runtime: &Runtime,
) -> anyhow::Result<Arc<dyn Backend>> {
    let target = model_target(gguf, model.config.block_count)?;
    let network = runtime.block_on(join_as_client(swarm))?;
    let handle = runtime.handle().clone();
    Ok(Arc::new(SwarmBackend::new(
        network,
        target,
        route.options(),
        handle,
    )))
}
