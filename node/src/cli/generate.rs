//! `allmende generate`: complete a prompt, streaming the text to stdout, with every
//! layer in this process (`--local`) or through the swarm.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use allmende_protocol::inference::ForwardLink;
use allmende_protocol::{LayerRange, WireDType};
use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;

use super::swarm::{join_as_client, model_file, model_target, SwarmArgs};
use crate::client::chat_template::ChatMessage;
use crate::client::connect::{connect, RouteOptions};
use crate::client::generate::{check_prompt, session_length};
use crate::client::{
    generate, ClientModel, Generation, GenerationParams, HopCounts, LocalPipeline, Pipeline,
    RouteSegment, SamplingParams,
};
use crate::model::{GgufFile, Shard};
use crate::network::PathInfo;

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// Run every layer in this process (the reference path the swarm is compared with)
    /// instead of using the swarm.
    #[arg(long, conflicts_with = "bootstrap")]
    local: bool,
    /// The GGUF model file [default: $ALLMENDE_MODEL, else the fetched SmolLM2 in the cache].
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text to complete.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Never choose an end-of-generation token: generate --max-tokens tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Compute threads [default: CPU cores - 1, at least 1].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Print one JSON object with ids and timings as the last line.
    #[arg(long)]
    json: bool,
    /// With --json: each generated token's log-probability (natural log, temperature 1)
    /// and the K most likely tokens at its position.
    #[arg(long, value_name = "K", requires = "json", value_parser = clap::value_parser!(u32).range(0..=100))]
    logprobs: Option<u32>,
    #[command(flatten)]
    route: RouteArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
}

/// Sampling flags, shared by `generate` and `chat`.
#[derive(Args, Debug)]
pub(super) struct SamplingArgs {
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
pub(super) struct RouteArgs {
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

struct Prepared {
    gguf: GgufFile,
    model: Arc<ClientModel>,
    prompt_ids: Vec<u32>,
    params: GenerationParams,
}

fn prepare(args: &GenerateArgs) -> anyhow::Result<Prepared> {
    let model_path = model_file(args.model.as_deref())?;
    let mut params = args.sampling.params(args.ignore_eos)?;
    params.logprobs = args.logprobs.map(|k| k as usize);
    let mut gguf = GgufFile::open(&model_path)?;
    let model = ClientModel::from_gguf(&mut gguf)?;
    let prompt_ids = match args.chat {
        true => model.chat_prompt_ids(&[ChatMessage::user(args.prompt.clone())])?,
        false => model.tokenizer.encode(&args.prompt)?,
    };
    check_prompt(&model, &prompt_ids)?;
    Ok(Prepared {
        gguf,
        model: Arc::new(model),
        prompt_ids,
        params,
    })
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    super::client_threads(args.threads, args.local);
    let prepared = prepare(&args)?;
    match args.local {
        true => run_local(&args, prepared),
        false => super::runtime()?.block_on(run_swarm(&args, prepared)),
    }
}

fn run_local(args: &GenerateArgs, p: Prepared) -> anyhow::Result<()> {
    let Prepared {
        mut gguf,
        model,
        prompt_ids,
        params,
    } = p;
    let all_layers = LayerRange::new(0, model.config.block_count as u32);
    let bar = super::loading_bar("loading layers");
    let shard = Shard::from_gguf(&mut gguf, model.config.clone(), all_layers, &bar)
        .with_context(|| format!("loading {}", gguf.path().display()))?;
    bar.finish_and_clear();
    drop(gguf);
    let max_len = session_length(&model, prompt_ids.len(), &params);
    let mut pipeline = LocalPipeline::new(vec![Arc::new(shard)], max_len);
    let output = stream_generation(&model, &mut pipeline, &prompt_ids, &params)?;
    report(args, &output, &prompt_ids, &params, None)
}

async fn run_swarm(args: &GenerateArgs, p: Prepared) -> anyhow::Result<()> {
    let Prepared {
        gguf,
        model,
        prompt_ids,
        params,
    } = p;
    let target = model_target(&gguf, model.config.block_count)?;
    drop(gguf);
    let network = join_as_client(&args.swarm).await?;
    let max_len = session_length(&model, prompt_ids.len(), &params) as u32;
    let mut pipeline = connect(&network, &target, max_len, args.route.options()).await?;
    let (output, pipeline) = tokio::task::spawn_blocking(move || {
        let output = stream_generation(&model, &mut pipeline, &prompt_ids, &params);
        (output.map(|o| (o, prompt_ids, params)), pipeline)
    })
    .await?;
    let route = pipeline.route();
    let failovers = serde_json::to_value(pipeline.failovers())?;
    let hops = pipeline.hops();
    let forward_links = pipeline.forward_links();
    let mut paths = Vec::with_capacity(route.len());
    for segment in &route {
        paths.push(network.path(segment.peer).await.ok().flatten());
    }
    pipeline.close().await;
    let (output, prompt_ids, params) = output?;
    let swarm = SwarmReport {
        route: &route,
        paths,
        forward_links,
        failovers,
        hops,
    };
    report(args, &output, &prompt_ids, &params, Some(swarm))
}

fn stream_generation(
    model: &ClientModel,
    pipeline: &mut dyn Pipeline,
    prompt_ids: &[u32],
    params: &GenerationParams,
) -> anyhow::Result<Generation> {
    let mut stdout = std::io::stdout().lock();
    let output = generate(model, pipeline, prompt_ids, params, &mut |piece| {
        // A closed stdout (e.g. `| head`) must not abort the generation with a panic.
        let _ = stdout.write_all(piece.text.as_bytes());
        let _ = stdout.flush();
        std::ops::ControlFlow::Continue(())
    })?;
    writeln!(stdout)?;
    Ok(output)
}

/// What a swarm generation adds to the report.
struct SwarmReport<'a> {
    /// The route at the end of the generation.
    route: &'a [RouteSegment],
    /// The path to each segment's server, when this client holds a connection to it.
    paths: Vec<Option<PathInfo>>,
    /// The link each segment's server handed outputs on over to the next one's.
    forward_links: Vec<Option<ForwardLink>>,
    failovers: serde_json::Value,
    hops: HopCounts,
}

fn report(
    args: &GenerateArgs,
    output: &Generation,
    prompt_ids: &[u32],
    params: &GenerationParams,
    swarm: Option<SwarmReport>,
) -> anyhow::Result<()> {
    if !args.json {
        return Ok(());
    }
    let mut report = json!({
        "text": output.text,
        "token_ids": output.token_ids,
        "prompt_token_ids": prompt_ids,
        "finish_reason": output.finish_reason,
        "seed": params.sampling.seed,
        "kernels": crate::model::kernels::Simd::in_use().name(),
        "timings": output.timings,
    });
    if let Some(logprobs) = &output.logprobs {
        report["logprobs"] = serde_json::to_value(logprobs)?;
    }
    if let Some(swarm) = swarm {
        report["route"] = swarm
            .route
            .iter()
            .zip(&swarm.paths)
            .zip(&swarm.forward_links)
            .map(|((s, path), link)| {
                let next = link.map(|link| {
                    let path = PathInfo::from_link(link);
                    json!({
                        "path": path.map(|p| p.kind),
                        "rtt_ms": path.and_then(|p| p.rtt_ms),
                    })
                });
                json!({
                    "peer": s.peer.to_string(),
                    "layers": [s.range.start, s.range.end],
                    "path": path.map(|p| p.kind),
                    "rtt_ms": path.and_then(|p| p.rtt_ms),
                    "forwards_to_next": next,
                })
            })
            .collect();
        report["failovers"] = swarm.failovers;
        report["hops"] = serde_json::to_value(swarm.hops)?;
    }
    println!("{report}");
    Ok(())
}
