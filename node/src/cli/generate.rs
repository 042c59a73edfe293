//! `allmende generate`: complete a prompt, streaming the text to stdout, with every
//! layer in this process (`--local`) or through the swarm, and with `--json` report
//! the tokens, timings and route.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use serde_json::json;

use super::layers::{local_backend, swarm_backend, RouteArgs, SamplingArgs};
use super::swarm::{model_file, SwarmArgs};
use crate::client::chat_template::ChatMessage;
use crate::client::generate::{check_prompt, session_length};
use crate::client::{ClientModel, Generation, GenerationParams, Generator, RouteReport};
use crate::model::GgufFile;
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
    let Prepared {
        mut gguf,
        model,
        prompt_ids,
        params,
    } = prepare(&args)?;
    // The swarm's network runs here; `--local` needs no runtime.
    let runtime = (!args.local).then(super::runtime).transpose()?;
    let backend = match &runtime {
        None => local_backend(&mut gguf, &model)?,
        Some(runtime) => swarm_backend(&gguf, &model, &args.swarm, &args.route, runtime)?,
    };
    drop(gguf);
    let capacity = session_length(&model, prompt_ids.len(), &params);
    let mut generator = Generator::new(model, backend, capacity);
    let mut stdout = std::io::stdout().lock();
    let output = generator.generate(&prompt_ids, &params, &mut |piece| {
        // A closed stdout (e.g. `| head`) must not abort the generation with a panic.
        let _ = stdout.write_all(piece.text.as_bytes());
        let _ = stdout.flush();
        std::ops::ControlFlow::Continue(())
    })?;
    writeln!(stdout)?;
    drop(stdout);
    let route = generator.close().unwrap_or(RouteReport::Local);
    report(&args, &output, &prompt_ids, &params, &route)
}

fn report(
    args: &GenerateArgs,
    output: &Generation,
    prompt_ids: &[u32],
    params: &GenerationParams,
    route: &RouteReport,
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
    if let RouteReport::Swarm(swarm) = route {
        report["route"] = swarm
            .segments
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
                    "numerics_version": s.numerics_version,
                    "path": path.map(|p| p.kind),
                    "rtt_ms": path.and_then(|p| p.rtt_ms),
                    "forwards_to_next": next,
                })
            })
            .collect();
        report["failovers"] = serde_json::to_value(&swarm.failovers)?;
        report["hops"] = serde_json::to_value(swarm.hops)?;
    }
    println!("{report}");
    Ok(())
}
