//! One session at a time: the local runs (every layer in one process, run in a child
//! process), the swarm runs, the prompt and settings they share, and their medians.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use allmende_protocol::{LayerRange, WireDType};
use anyhow::Context;
use serde::Serialize;

use super::BenchArgs;
use crate::client::connect::RouteOptions;
use crate::client::routes::ModelTarget;
use crate::client::{
    Backend, ClientModel, GenerateError, Generation, GenerationParams, Generator, LocalBackend,
    SamplingParams, SwarmBackend, Timings,
};
use crate::model::{GgufFile, Shard};

/// candle's setting for how long idle compute threads spin ([`super::share_cores`]).
pub(super) const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// One local run, as the child process reports it.
#[derive(Serialize, serde::Deserialize)]
pub(super) struct LocalRun {
    pub timings: Timings,
    pub token_ids: Vec<u32>,
}

/// Medians of a single session's runs.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Single {
    time_to_first_token_ms: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

/// One generation through the swarm's nodes.
pub(super) struct Swarm<'a> {
    pub network: &'a crate::network::Network,
    pub target: &'a ModelTarget,
    pub max_len: u32,
    pub model: &'a Arc<ClientModel>,
    pub prompt: &'a [u32],
    pub params: &'a GenerationParams,
}

impl Swarm<'_> {
    /// `forward`: servers forward outputs to each other; otherwise the client relays.
    pub async fn run(&self, forward: bool) -> anyhow::Result<(Timings, Vec<u32>)> {
        let options = RouteOptions {
            forward,
            ..RouteOptions::new(WireDType::F32, Duration::from_secs(20))
        };
        let handle = tokio::runtime::Handle::current();
        let backend = SwarmBackend::new(self.network.clone(), self.target.clone(), options, handle);
        let generator =
            Generator::new(self.model.clone(), Arc::new(backend), self.max_len as usize);
        let (prompt, params) = (self.prompt.to_vec(), self.params.clone());
        let g = tokio::task::spawn_blocking(move || run_once(generator, &prompt, &params)).await?;
        let g = g?;
        Ok((g.timings, g.token_ids))
    }
}

/// One generation without a listener, its session closed afterwards.
pub(super) fn run_once(
    mut generator: Generator,
    prompt: &[u32],
    params: &GenerationParams,
) -> Result<Generation, GenerateError> {
    let g = generator.generate(prompt, params, &mut |_| std::ops::ControlFlow::Continue(()));
    generator.close();
    g
}

/// Greedy generation of `--tokens` tokens, end-of-text ignored.
pub(super) fn bench_params(args: &BenchArgs) -> GenerationParams {
    GenerationParams {
        max_tokens: args.tokens as usize,
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        },
        ignore_eos: true,
        logprobs: None,
    }
}

/// The local runs: every layer in this process.
pub(super) fn local_runs(model_path: &Path, args: &BenchArgs) -> anyhow::Result<Vec<LocalRun>> {
    let mut gguf = GgufFile::open(model_path)?;
    let model = ClientModel::from_gguf(&mut gguf)?;
    let prompt = bench_prompt(&model, args.prompt_tokens as usize)?;
    let params = bench_params(args);
    let shard = Arc::new(Shard::from_gguf(
        &mut gguf,
        model.config.clone(),
        LayerRange::new(0, model.config.block_count as u32),
        &indicatif::ProgressBar::hidden(),
    )?);
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(vec![shard]));
    let model = Arc::new(model);
    let max_len = prompt.len() + params.max_tokens;
    (0..args.runs)
        .map(|_| {
            let generator = Generator::new(model.clone(), backend.clone(), max_len);
            let g = run_once(generator, &prompt, &params)?;
            Ok(LocalRun {
                timings: g.timings,
                token_ids: g.token_ids,
            })
        })
        .collect()
}

/// One of [`local_runs`] in a child process of this binary, with `generate --local`'s
/// settings: candle's spin limit unless the user set one (`user_spin_limit`).
pub(super) fn local_run_in_child(
    model_path: &Path,
    args: &BenchArgs,
    user_spin_limit: bool,
) -> anyhow::Result<LocalRun> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut child = std::process::Command::new(exe);
    if !user_spin_limit {
        child.env_remove(SPIN_LIMIT_VAR);
    }
    let out = child
        .arg("bench")
        .arg("--local-only")
        .arg("--model")
        .arg(model_path)
        .args(["--threads", &args.threads.to_string()])
        .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
        .args(["--tokens", &args.tokens.to_string()])
        .args(["--runs", "1"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the local measurement")?;
    if !out.status.success() {
        anyhow::bail!("the local measurement failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let runs: Vec<LocalRun> =
        serde_json::from_str(last).context("reading the local measurement's report")?;
    runs.into_iter()
        .next()
        .context("the local measurement reported no runs")
}

/// A prompt of exactly `n` tokens: ordinary text, repeated and cut.
pub(super) fn bench_prompt(model: &ClientModel, n: usize) -> anyhow::Result<Vec<u32>> {
    let text = "The history of the city is long and full of events. ".repeat(n / 8 + 2);
    let mut ids = model.tokenizer.encode(&text)?;
    ids.truncate(n.min(model.config.context_length.saturating_sub(1)));
    Ok(ids)
}

/// The median of `values` (not empty).
pub(super) fn middle(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians, field by field, of several runs' timings.
pub(super) fn median(runs: &[Timings]) -> Single {
    let mid = |f: fn(&Timings) -> f64| middle(&runs.iter().map(f).collect::<Vec<_>>());
    Single {
        time_to_first_token_ms: mid(|t| t.prefill_ms),
        prefill_tokens_per_s: mid(|t| t.prefill_tokens_per_s),
        decode_tokens_per_s: mid(|t| t.decode_tokens_per_s),
    }
}
