//! `allmende bench`: speed and memory in one run, as ratios of the same binary on the
//! same machine, written as a JSON report.
//!
//! 1. Local: prefill, time to first token and decode of one process with all layers,
//!    run as a child process with `generate --local`'s settings (this process runs as
//!    a swarm process, whose compute threads give up their cores sooner).
//! 2. Swarm: the same generation through `--nodes` `serve` processes on loopback, and
//!    from the two the overhead each node on the route adds per token; then once more
//!    with the client relaying every output instead of the servers forwarding them. Local and
//!    swarm runs alternate, and ratios are the medians of each pair's ratio: the
//!    machine's speed may drift more between minutes than the ratio itself.
//! 3. Sessions: aggregate decode rate of 1, 4, 8 ... concurrent sessions against one
//!    node hosting every layer (continuous batching), see [`load`].
//! 4. Memory: every node's peak resident set against its layers' weights, its KV
//!    caches and a 60 MB allowance.

mod load;
mod nodes;
mod single;

use std::path::PathBuf;
use std::sync::Arc;

use allmende_protocol::LayerRange;
use anyhow::Context;
use clap::Args;
use serde::Serialize;
use serde_json::json;

use crate::client::{ClientModel, Timings};
use crate::model::kv_cache::bytes_per_position_and_layer;
use crate::model::shard::layer_bytes;
use crate::model::{GgufFile, ModelConfig};

use nodes::{split_layers, ServeProcess};
use single::{
    bench_params, bench_prompt, local_run_in_child, local_runs, median, middle, Swarm,
    SPIN_LIMIT_VAR,
};

/// What a node may hold beyond its weights and KV caches.
const ALLOWANCE_BYTES: u64 = 60 * 1024 * 1024;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// The GGUF model file [default: $ALLMENDE_MODEL, else the fetched SmolLM2 in the cache].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads, for this process and for every node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Nodes the model is split across for the swarm measurement.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    prompt_tokens: u32,
    /// Tokens generated per run (greedy, end-of-text ignored).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(2..))]
    tokens: u32,
    /// Runs of each single-session measurement; the report keeps the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Concurrent session counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    sessions: Vec<usize>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-report.json")]
    output: PathBuf,
    /// Internal: only the local runs, printed as one JSON line (the child process of
    /// step 1).
    #[arg(long, hide = true)]
    local_only: bool,
}

#[derive(Clone, Debug, Serialize)]
struct NodeMemory {
    layers: [u32; 2],
    peak_rss_bytes: u64,
    peak_rss_per_layer_bytes: u64,
    /// Resident in transparent huge pages at the end of the run (0 where the system
    /// has none or does not say).
    huge_page_bytes: u64,
    weight_bytes: u64,
    kv_cache_bytes: u64,
    /// Weights + KV caches + 60 MB.
    budget_bytes: u64,
    within_budget: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.sessions.is_empty() || args.sessions.contains(&0) {
        anyhow::bail!("--sessions needs positive counts, e.g. 1,4,8");
    }
    super::set_compute_threads(usize::from(args.threads));
    let model_path = super::swarm::model_file(args.model.as_deref())?;
    if args.local_only {
        let runs = local_runs(&model_path, &args)?;
        println!("{}", serde_json::to_string(&runs)?);
        return Ok(());
    }
    // The local runs' child keeps candle's spin limit unless the user set one.
    let user_spin_limit = std::env::var_os(SPIN_LIMIT_VAR).is_some();
    // This process is the swarm's client: its compute threads must not hold the
    // cores the nodes need.
    super::share_cores();
    let mut gguf = GgufFile::open(&model_path)?;
    let model = Arc::new(ClientModel::from_gguf(&mut gguf)?);
    let config = model.config.clone();
    let prompt = bench_prompt(&model, args.prompt_tokens as usize)?;
    let params = bench_params(&args);
    let layers = config.block_count as u32;
    let target = super::swarm::model_target(&gguf, config.block_count)?;
    let all = LayerRange::new(0, layers);
    let max_len = prompt.len() + params.max_tokens;

    let runtime = super::runtime()?;
    let threads = usize::from(args.threads);
    let ranges = split_layers(layers, args.nodes);
    eprintln!(
        "local (every layer, in a child process) and swarm ({} nodes: {ranges:?}), alternating",
        ranges.len()
    );
    let (pairs, swarm_memory) = runtime.block_on(async {
        let nodes = start_nodes(&model_path, &ranges, threads)?;
        let network = client_network(&nodes).await?;
        let mut pairs = Vec::new();
        for _ in 0..args.runs {
            // Each local run next to a swarm run, so that their ratio is measured in
            // the same minute: this machine's speed drifts more than the ratio.
            let child = (model_path.clone(), args.clone());
            let local = tokio::task::spawn_blocking(move || {
                local_run_in_child(&child.0, &child.1, user_spin_limit)
            })
            .await??;
            let swarm = Swarm {
                network: &network,
                target: &target,
                max_len: max_len as u32,
                model: &model,
                prompt: &prompt,
                params: &params,
            };
            let forwarded = swarm.run(true).await?;
            let relayed = swarm.run(false).await?;
            pairs.push((local, forwarded, relayed));
        }
        let kv = kv_bytes(&config, max_len, 1);
        let memory = memory_of(&gguf, &nodes, kv);
        anyhow::Ok((pairs, memory))
    })?;
    let identical = pairs
        .iter()
        .all(|(l, f, r)| f.1 == l.token_ids && r.1 == l.token_ids);
    let local = median(
        &pairs
            .iter()
            .map(|p| p.0.timings.clone())
            .collect::<Vec<_>>(),
    );
    let swarm = median(&pairs.iter().map(|p| p.1 .0.clone()).collect::<Vec<_>>());
    let relayed = median(&pairs.iter().map(|p| p.2 .0.clone()).collect::<Vec<_>>());
    let paired = |f: fn(&Timings) -> f64| -> Vec<f64> {
        pairs
            .iter()
            .map(|(l, s, _)| f(&s.0) / f(&l.timings))
            .collect()
    };
    let decode_ratios = paired(|t| t.decode_tokens_per_s);
    let prefill_ratios = paired(|t| t.prefill_tokens_per_s);
    let relayed_ratios: Vec<f64> = pairs
        .iter()
        .map(|(l, _, r)| r.0.decode_tokens_per_s / l.timings.decode_tokens_per_s)
        .collect();
    let forwarding_gains: Vec<f64> = pairs
        .iter()
        .map(|(_, f, r)| f.0.decode_tokens_per_s / r.0.decode_tokens_per_s)
        .collect();
    // What each node on the route adds to a token's time.
    let overheads: Vec<f64> = pairs
        .iter()
        .map(|(l, s, _)| {
            let (s, l) = (s.0.decode_tokens_per_s, l.timings.decode_tokens_per_s);
            (1e3 / s - 1e3 / l) / ranges.len() as f64
        })
        .collect();

    let session_prompt: Vec<u32> = prompt.iter().copied().take(32).collect();
    let steps = args.tokens as usize;
    eprintln!(
        "sessions: {:?} against one node with every layer",
        args.sessions
    );
    let (load_results, load_memory) = runtime.block_on(async {
        let nodes = start_nodes(&model_path, &[all], threads)?;
        let network = client_network(&nodes).await?;
        let mut results = Vec::new();
        for &n in &args.sessions {
            let r = load::run(&network, &target, &model, &session_prompt, n, steps).await?;
            eprintln!(
                "  {n} sessions: {:.1} tokens/s together",
                r.aggregate_tokens_per_s
            );
            results.push(r);
        }
        let most = args.sessions.iter().copied().max().unwrap_or(1);
        let kv = kv_bytes(&config, session_prompt.len() + steps + 1, most);
        let memory = memory_of(&gguf, &nodes, kv);
        anyhow::Ok((results, memory))
    })?;
    let one = load_results
        .iter()
        .find(|r| r.sessions == 1)
        .map(|r| r.aggregate_tokens_per_s);

    let report = json!({
        "model": gguf.string("general.name").unwrap_or("unnamed model"),
        "threads_per_process": threads,
        "kernels": crate::model::kernels::Simd::in_use().name(),
        "prompt_tokens": prompt.len(),
        "generated_tokens": params.max_tokens,
        "runs": args.runs,
        "local": local,
        "swarm": {
            "nodes": ranges.len(),
            "single": swarm,
            "decode_ratio_to_local": middle(&decode_ratios),
            "decode_ratios_per_run": decode_ratios,
            "prefill_ratio_to_local": middle(&prefill_ratios),
            "overhead_per_node_per_token_ms": middle(&overheads),
            "tokens_identical_to_local": identical,
            "memory": swarm_memory,
            "relayed_by_client": {
                "single": relayed,
                "decode_ratio_to_local": middle(&relayed_ratios),
                "decode_ratios_per_run": relayed_ratios,
                "forwarding_decode_gain": middle(&forwarding_gains),
            },
        },
        "sessions": {
            "node_layers": [0, layers],
            "prompt_tokens": session_prompt.len(),
            "results": load_results.iter().map(|r| json!({
                "sessions": r.sessions,
                "steps_per_session": r.steps_per_session,
                "aggregate_tokens_per_s": r.aggregate_tokens_per_s,
                "per_session_tokens_per_s": r.per_session_tokens_per_s,
                "ratio_to_one_session": one.map(|o| r.aggregate_tokens_per_s / o),
            })).collect::<Vec<_>>(),
            "memory": load_memory,
        },
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.output, &text)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("{text}");
    eprintln!("report written to {}", args.output.display());
    Ok(())
}

fn start_nodes(
    model: &std::path::Path,
    ranges: &[LayerRange],
    threads: usize,
) -> anyhow::Result<Vec<ServeProcess>> {
    let mut nodes: Vec<ServeProcess> = Vec::new();
    for &range in ranges {
        let bootstrap = nodes.first().map(|n| n.addr.clone());
        nodes.push(ServeProcess::start(
            model,
            range,
            threads,
            bootstrap.as_deref(),
        )?);
    }
    Ok(nodes)
}

async fn client_network(nodes: &[ServeProcess]) -> anyhow::Result<crate::network::Network> {
    let args = super::swarm::SwarmArgs {
        bootstrap: nodes
            .iter()
            .map(|n| n.addr.parse())
            .collect::<Result<_, _>>()?,
        no_mdns: true,
        swarm_key: None,
    };
    super::swarm::join_as_client(&args).await
}

/// KV cache bytes of `sessions` sessions of `positions`, summed over all layers.
fn kv_bytes(config: &ModelConfig, positions: usize, sessions: usize) -> u64 {
    (sessions * positions * config.block_count) as u64
        * bytes_per_position_and_layer(config.kv_size())
}

/// `kv_all_layers`: KV bytes summed over all layers; each node holds its share.
fn memory_of(gguf: &GgufFile, nodes: &[ServeProcess], kv_all_layers: u64) -> Vec<NodeMemory> {
    let layers_total = nodes.iter().map(|n| n.range.len()).sum::<u32>().max(1) as u64;
    nodes
        .iter()
        .map(|n| {
            let hosted = n.range.len() as u64;
            let weight_bytes: u64 = n.range.iter().map(|i| layer_bytes(gguf, i as usize)).sum();
            let kv_cache_bytes = kv_all_layers / layers_total * hosted;
            let peak = n.peak_rss().unwrap_or(0);
            let budget = weight_bytes + kv_cache_bytes + ALLOWANCE_BYTES;
            NodeMemory {
                layers: [n.range.start, n.range.end],
                peak_rss_bytes: peak,
                peak_rss_per_layer_bytes: peak / hosted.max(1),
                huge_page_bytes: n.huge_page_bytes().unwrap_or(0),
                weight_bytes,
                kv_cache_bytes,
                budget_bytes: budget,
                within_budget: peak > 0 && peak <= budget,
            }
        })
        .collect()
}
