//! `allmende chat`: an interactive conversation in the terminal, through the swarm or
//! with `--local`. The conversation is kept as messages and rendered with the model's
//! chat template; the session stays open across turns, so a turn sends only its new
//! tokens. Ctrl-C stops an answer (what was said so far stays the assistant's turn);
//! Ctrl-C at the prompt, Ctrl-D, `/exit` or `/bye` leave.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use allmende_protocol::LayerRange;
use anyhow::Context;
use clap::Args;
use tokio::runtime::Runtime;

use super::generate::{RouteArgs, SamplingArgs};
use super::swarm::{join_as_client, model_file, model_target, SwarmArgs};
use crate::client::connect::{connect, ModelTarget, RouteOptions};
use crate::client::conversation::{Conversation, Turn};
use crate::client::{
    continue_session, ClientModel, Generation, GenerationParams, LocalPipeline, Pipeline,
    RemotePipeline, SessionSpan,
};
use crate::model::{GgufFile, Shard};
use crate::network::Network;

const HELP: &str =
    "/reset starts a new conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer";

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct ChatArgs {
    /// Run every layer in this process instead of using the swarm.
    #[arg(long, conflicts_with = "bootstrap")]
    local: bool,
    /// The GGUF model file [default: $ALLMENDE_MODEL, else the fetched SmolLM2 in the cache].
    #[arg(long)]
    model: Option<PathBuf>,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Positions the conversation's session holds (prompts and answers together)
    /// [default: 4096, or the model's context if smaller].
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..))]
    context: Option<u32>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Compute threads [default: CPU cores - 1, at least 1].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(flatten)]
    route: RouteArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
}

/// The default session length: a long conversation, without asking servers to reserve
/// their whole context for one user.
const DEFAULT_CONTEXT: usize = 4096;

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    super::client_threads(args.threads, args.local);
    let params = args.sampling.params(false)?;
    let model_path = model_file(args.model.as_deref())?;
    let mut gguf = GgufFile::open(&model_path)?;
    let model = ClientModel::from_gguf(&mut gguf)?;
    if model.tokenizer.chat_template().is_none() {
        anyhow::bail!("{} has no chat template (tokenizer.chat_template); use `allmende generate` for plain completion", model_path.display());
    }
    let capacity = args
        .context
        .map_or(DEFAULT_CONTEXT, |c| c as usize)
        .min(model.config.context_length);
    let runtime = super::runtime()?;
    let backend = match args.local {
        true => {
            let all = LayerRange::new(0, model.config.block_count as u32);
            let bar = super::loading_bar("loading layers");
            let shard = Shard::from_gguf(&mut gguf, model.config.clone(), all, &bar)
                .with_context(|| format!("loading {}", model_path.display()))?;
            bar.finish_and_clear();
            Backend::Local(Arc::new(shard))
        }
        false => {
            let target = model_target(&gguf, model.config.block_count)?;
            let network = runtime.block_on(join_as_client(&args.swarm))?;
            Backend::Swarm {
                network,
                target,
                options: args.route.options(),
            }
        }
    };
    drop(gguf);
    let interrupt = Interrupt::install(&runtime);
    let mut chat = Chat {
        model,
        backend,
        runtime,
        capacity,
        params,
        pipeline: None,
        conversation: Conversation::new(args.system.clone()),
        interrupt,
        turns: 0,
    };
    let name = chat.backend.describe();
    eprintln!("chatting through {name}; {HELP}");
    let result = chat.repl();
    chat.close_session();
    result
}

/// Where the layers run.
#[allow(clippy::large_enum_variant)] // one per process
enum Backend {
    Local(Arc<Shard>),
    Swarm {
        network: Network,
        target: ModelTarget,
        options: RouteOptions,
    },
}

impl Backend {
    fn describe(&self) -> String {
        match self {
            Backend::Local(_) => "every layer in this process".into(),
            Backend::Swarm { target, .. } => format!("the swarm serving {}", target.name),
        }
    }

    fn open(&self, runtime: &Runtime, capacity: usize) -> anyhow::Result<Session> {
        Ok(match self {
            Backend::Local(shard) => {
                Session::Local(LocalPipeline::new(vec![shard.clone()], capacity))
            }
            Backend::Swarm {
                network,
                target,
                options,
            } => Session::Remote(runtime.block_on(connect(
                network,
                target,
                capacity as u32,
                *options,
            ))?),
        })
    }
}

/// One open session of the conversation.
#[allow(clippy::large_enum_variant)] // one per process
enum Session {
    Local(LocalPipeline),
    Remote(RemotePipeline),
}

impl Session {
    fn pipeline(&mut self) -> &mut dyn Pipeline {
        match self {
            Session::Local(p) => p,
            Session::Remote(p) => p,
        }
    }

    fn close(self, runtime: &Runtime) {
        if let Session::Remote(p) = self {
            runtime.block_on(p.close());
        }
    }
}

/// Ctrl-C: stops the answer being generated, or leaves when there is none.
#[derive(Clone)]
struct Interrupt {
    generating: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Interrupt {
    fn install(runtime: &Runtime) -> Self {
        let this = Self {
            generating: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let handler = this.clone();
        runtime.spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                match handler.generating.load(Ordering::SeqCst) {
                    true => handler.stop.store(true, Ordering::SeqCst),
                    false => {
                        eprintln!();
                        std::process::exit(130);
                    }
                }
            }
        });
        this
    }
}

struct Chat {
    model: ClientModel,
    backend: Backend,
    runtime: Runtime,
    capacity: usize,
    params: GenerationParams,
    pipeline: Option<Session>,
    conversation: Conversation,
    interrupt: Interrupt,
    turns: u64,
}

impl Chat {
    fn repl(&mut self) -> anyhow::Result<()> {
        let stdin = std::io::stdin();
        let interactive = stdin.is_terminal();
        let mut line = String::new();
        loop {
            if interactive {
                print!(">>> ");
                std::io::stdout().flush()?;
            }
            line.clear();
            if stdin.lock().read_line(&mut line)? == 0 {
                if interactive {
                    println!();
                }
                return Ok(());
            }
            let text = line.trim();
            match text {
                "" => continue,
                "/exit" | "/bye" | "/quit" => return Ok(()),
                "/reset" | "/clear" => {
                    self.close_session();
                    self.conversation.reset();
                    eprintln!("(a new conversation)");
                }
                "/help" | "/?" => eprintln!("{HELP}"),
                _ if text.starts_with('/') => eprintln!("unknown command {text}; {HELP}"),
                _ => {
                    if let Err(e) = self.turn(text) {
                        eprintln!("error: {e:#}");
                    }
                }
            }
        }
    }

    /// One question and its streamed answer.
    fn turn(&mut self, text: &str) -> anyhow::Result<()> {
        let turn = self.conversation.ask(&self.model, text)?;
        if turn.tokens.len() >= self.capacity {
            self.conversation.withdraw();
            anyhow::bail!(
                "the conversation would take {} of the session's {} positions; /reset to start again (or a larger --context)",
                turn.tokens.len(),
                self.capacity
            );
        }
        match self.answer(&turn) {
            Ok(reply) => {
                tracing::debug!(
                    "turn sent {} new tokens after {} held; the session holds {}",
                    turn.tokens.len() - turn.held,
                    turn.held,
                    reply.positions
                );
                self.conversation.answer(turn, &reply);
                Ok(())
            }
            Err(e) => {
                // The session's state after a failed step is unknown: start afresh.
                self.conversation.withdraw();
                self.close_session();
                Err(e)
            }
        }
    }

    /// Streams the answer to `turn`, in the open session when the turn continues it
    /// (the conversation holds tokens only while its session is open), else in a new
    /// one.
    fn answer(&mut self, turn: &Turn) -> anyhow::Result<Generation> {
        if turn.held == 0 {
            self.close_session();
        }
        let session = match &mut self.pipeline {
            Some(session) => session,
            None => self
                .pipeline
                .insert(self.backend.open(&self.runtime, self.capacity)?),
        };
        let span = SessionSpan {
            past: turn.held,
            capacity: self.capacity,
        };
        // A new seed each turn: the same seed would repeat one random stream every turn.
        let mut params = self.params.clone();
        params.sampling.seed = params.sampling.seed.wrapping_add(self.turns);
        self.turns += 1;

        let interrupt = self.interrupt.clone();
        interrupt.stop.store(false, Ordering::SeqCst);
        interrupt.generating.store(true, Ordering::SeqCst);
        let mut stdout = std::io::stdout().lock();
        let result = continue_session(
            &self.model,
            session.pipeline(),
            span,
            &turn.tokens[turn.held..],
            &params,
            &mut |piece| {
                let _ = stdout.write_all(piece.text.as_bytes());
                let _ = stdout.flush();
                match interrupt.stop.load(Ordering::SeqCst) {
                    true => ControlFlow::Break(()),
                    false => ControlFlow::Continue(()),
                }
            },
        );
        interrupt.generating.store(false, Ordering::SeqCst);
        if interrupt.stop.swap(false, Ordering::SeqCst) {
            let _ = write!(stdout, " [stopped]");
        }
        let _ = writeln!(stdout);
        Ok(result?)
    }

    fn close_session(&mut self) {
        if let Some(session) = self.pipeline.take() {
            session.close(&self.runtime);
        }
        self.conversation.forget_session();
    }
}
