//! Concurrent sessions against the swarm, as many users would open them: each session
//! prefills its own prompt, then all step together, one position per step. Inputs are
//! fixed token streams fed to each generator (teacher forcing), so this process only
//! embeds tokens and the measured rate is the servers' alone: with real users every
//! client computes its own LM head on its own machine.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use allmende_protocol::WireDType;
use anyhow::Context;
use serde::Serialize;

use crate::client::connect::RouteOptions;
use crate::client::routes::ModelTarget;
use crate::client::{Backend, ClientModel, Generator, SwarmBackend};
use crate::network::Network;

#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub sessions: usize,
    pub steps_per_session: usize,
    /// All sessions' decode steps over the wall time from the common start to the
    /// last session's end.
    pub aggregate_tokens_per_s: f64,
    /// The mean of each session's own rate.
    pub per_session_tokens_per_s: f64,
}

/// Runs `sessions` sessions of `prompt` (offset per session, so no two are alike)
/// followed by `steps` single-position steps each.
pub async fn run(
    network: &Network,
    target: &ModelTarget,
    model: &Arc<ClientModel>,
    prompt: &[u32],
    sessions: usize,
    steps: usize,
) -> anyhow::Result<LoadResult> {
    let max_len = prompt.len() + steps + 1;
    let options = RouteOptions::new(WireDType::F32, Duration::from_secs(20));
    let handle = tokio::runtime::Handle::current();
    let backend: Arc<dyn Backend> = Arc::new(SwarmBackend::new(
        network.clone(),
        target.clone(),
        options,
        handle,
    ));
    let mut generators: Vec<Generator> = (0..sessions)
        .map(|_| Generator::new(model.clone(), backend.clone(), max_len))
        .collect();
    // Every session is open before any starts.
    let generators = tokio::task::spawn_blocking(move || {
        for generator in &mut generators {
            generator.open().context("opening a benchmark session")?;
        }
        anyhow::Ok(generators)
    })
    .await??;
    let start_line = Arc::new(Barrier::new(sessions));
    let vocab = model.head.vocab_size() as u32;
    let tasks: Vec<_> = generators
        .into_iter()
        .enumerate()
        .map(|(k, mut generator)| {
            let start_line = start_line.clone();
            let prompt: Vec<u32> = prompt.iter().map(|&t| (t + k as u32) % vocab).collect();
            tokio::task::spawn_blocking(move || {
                let prefill = generator.feed(&prompt);
                // Every session reaches the start line, failed or not.
                start_line.wait();
                let result = prefill.map_err(anyhow::Error::from).and_then(|_| {
                    let start = Instant::now();
                    for step in 0..steps {
                        generator.feed(&[prompt[step % prompt.len()]])?;
                    }
                    Ok((start, Instant::now()))
                });
                generator.close();
                result
            })
        })
        .collect();
    let mut spans = Vec::with_capacity(sessions);
    let mut failure = None;
    for task in tasks {
        match task.await? {
            Ok(span) => spans.push(span),
            Err(e) => failure = Some(e),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let first = spans.iter().map(|s| s.0).min().context("no sessions")?;
    let last = spans.iter().map(|s| s.1).max().context("no sessions")?;
    let wall = (last - first).as_secs_f64().max(1e-9);
    let per_session = spans
        .iter()
        .map(|(a, b)| steps as f64 / (*b - *a).as_secs_f64().max(1e-9))
        .sum::<f64>()
        / sessions as f64;
    Ok(LoadResult {
        sessions,
        steps_per_session: steps,
        aggregate_tokens_per_s: (sessions * steps) as f64 / wall,
        per_session_tokens_per_s: per_session,
    })
}
