//! `allmende generate`: complete a prompt, streaming the text to stdout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use allmende_protocol::LayerRange;
use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use crate::client::chat_template::ChatMessage;
use crate::client::generate::{check_prompt, session_length};
use crate::client::{generate, ClientModel, GenerationParams, LocalPipeline, SamplingParams};
use crate::model::{GgufFile, Shard};
use crate::paths;

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// Run every layer in this process (the reference path the swarm is compared with).
    #[arg(long, required = true)]
    local: bool,
    /// The GGUF model file [default: $ALLMENDE_MODEL, else the fetched SmolLM2 in the cache].
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text to complete.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only from the K most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only from the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling [default: drawn at random, and reported with --json].
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating after end-of-generation tokens.
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
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    super::set_compute_threads(
        args.threads
            .map_or_else(super::default_threads, usize::from),
    );
    let model_path = args.model.clone().unwrap_or_else(paths::default_model);
    if !model_path.exists() {
        bail!(
            "model file {} not found; fetch it with scripts/fetch-model.sh, or pass --model PATH",
            model_path.display()
        );
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed,
        },
        ignore_eos: args.ignore_eos,
    };
    params.sampling.validate()?;

    let mut gguf = GgufFile::open(&model_path)?;
    let model = ClientModel::from_gguf(&mut gguf)?;
    let prompt = match args.chat {
        true => model.chat_prompt(&[ChatMessage::user(args.prompt.clone())])?,
        false => args.prompt.clone(),
    };
    let prompt_ids = model.tokenizer.encode(&prompt)?;
    check_prompt(&model, &prompt_ids)?;

    let all_layers = LayerRange::new(0, model.config.block_count as u32);
    let bar = super::loading_bar("loading layers");
    let shard = Shard::from_gguf(&mut gguf, model.config.clone(), all_layers, &bar)
        .with_context(|| format!("loading {}", model_path.display()))?;
    bar.finish_and_clear();
    drop(gguf);

    let mut pipeline = LocalPipeline::new(
        vec![Arc::new(shard)],
        session_length(&model, prompt_ids.len(), &params),
    );
    let mut stdout = std::io::stdout().lock();
    let output = generate(&model, &mut pipeline, &prompt_ids, &params, &mut |piece| {
        // A closed stdout (e.g. `| head`) must not abort the generation with a panic.
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    writeln!(stdout)?;
    if args.json {
        let report = json!({
            "text": output.text,
            "token_ids": output.token_ids,
            "prompt_token_ids": prompt_ids,
            "finish_reason": output.finish_reason,
            "seed": seed,
            "timings": output.timings,
        });
        writeln!(stdout, "{report}")?;
    }
    Ok(())
}
