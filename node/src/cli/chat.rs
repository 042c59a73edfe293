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

use clap::Args;
use tokio::runtime::Runtime;

use super::layers::{local_backend, swarm_backend, RouteArgs, SamplingArgs};
use super::swarm::{model_file, SwarmArgs};
use crate::client::conversation::Conversation;
use crate::client::{ClientModel, GenerationParams, Generator};
use crate::model::GgufFile;

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
        true => local_backend(&mut gguf, &model)?,
        false => swarm_backend(&gguf, &model, &args.swarm, &args.route, &runtime)?,
    };
    drop(gguf);
    eprintln!("chatting through {}; {HELP}", backend.describe());
    let interrupt = Interrupt::install(&runtime);
    let mut chat = Chat {
        generator: Generator::new(Arc::new(model), backend, capacity),
        params,
        conversation: Conversation::new(args.system.clone()),
        interrupt,
        turns: 0,
    };
    let result = chat.repl();
    chat.generator.close();
    result
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
    generator: Generator,
    params: GenerationParams,
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
                    self.generator.close();
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
        let tokens = self.conversation.ask(self.generator.model(), text)?;
        let capacity = self.generator.capacity();
        if tokens.len() >= capacity {
            self.conversation.withdraw();
            anyhow::bail!(
                "the conversation would take {} of the session's {capacity} positions; /reset to start again (or a larger --context)",
                tokens.len(),
            );
        }
        let past = self.generator.kept_of(&tokens);
        match self.answer(&tokens) {
            Ok(reply) => {
                tracing::debug!(
                    "turn sent {} new tokens after {past} held; the session holds {}",
                    tokens.len() - past,
                    reply.positions
                );
                self.conversation.answer(&reply);
                Ok(())
            }
            Err(e) => {
                // The generator closed the session, whose state is unknown.
                self.conversation.withdraw();
                Err(e)
            }
        }
    }

    /// Streams the answer to the conversation rendered as `tokens`; the generator
    /// sends only what its session does not hold yet.
    fn answer(&mut self, tokens: &[u32]) -> anyhow::Result<crate::client::Generation> {
        // A new seed each turn: the same seed would repeat one random stream every turn.
        let mut params = self.params.clone();
        params.sampling.seed = params.sampling.seed.wrapping_add(self.turns);
        self.turns += 1;

        let interrupt = self.interrupt.clone();
        interrupt.stop.store(false, Ordering::SeqCst);
        interrupt.generating.store(true, Ordering::SeqCst);
        let mut stdout = std::io::stdout().lock();
        let result = self.generator.generate(tokens, &params, &mut |piece| {
            let _ = stdout.write_all(piece.text.as_bytes());
            let _ = stdout.flush();
            match interrupt.stop.load(Ordering::SeqCst) {
                true => ControlFlow::Break(()),
                false => ControlFlow::Continue(()),
            }
        });
        interrupt.generating.store(false, Ordering::SeqCst);
        if interrupt.stop.swap(false, Ordering::SeqCst) {
            let _ = write!(stdout, " [stopped]");
        }
        let _ = writeln!(stdout);
        Ok(result?)
    }
}
