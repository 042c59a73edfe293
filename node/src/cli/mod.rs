//! The `allmende` command line: argument parsing and the commands behind it.

mod bench;
mod chat;
mod gateway;
mod generate;
mod keygen;
mod layers;
mod serve;
mod status;
mod swarm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::chat_template;

/// The version, with the git commit it was built from when built from a checkout
/// (set by build.rs).
const VERSION: &str = env!("ALLMENDE_VERSION");

#[derive(Parser, Debug)]
#[command(
    name = "allmende",
    version = VERSION,
    about = "Run large language models together: donate compute to the swarm, or send it prompts."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt, through the swarm or with --local.
    Generate(generate::GenerateArgs),
    /// Chat with the model in the terminal, through the swarm or with --local.
    Chat(chat::ChatArgs),
    /// Donate compute: host a range of the model's layers for the swarm.
    Serve(Box<serve::ServeArgs>),
    /// Show which servers host which layers of a model, and what is missing.
    Status(status::StatusArgs),
    /// Serve the OpenAI-compatible API and the web page for a swarm, hosting no layers.
    Gateway(gateway::GatewayArgs),
    /// Write a new pre-shared key for a private swarm.
    Keygen(keygen::KeygenArgs),
    /// Measure speed and memory (local, through a loopback swarm, concurrent sessions)
    /// and write a JSON report.
    Bench(bench::BenchArgs),
    /// Renders one chat template request from standard input: the child process every
    /// render of this binary runs in.
    #[command(name = "render-template", hide = true)]
    RenderTemplate,
}

/// Parses the command line, runs the command, and turns errors into a message and a
/// non-zero exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::RenderTemplate) {
        chat_template::render_in_child_processes(own_program());
        init_logging();
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Status(args) => status::run(args),
        Command::Gateway(args) => gateway::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Bench(args) => bench::run(args),
        Command::RenderTemplate => return chat_template::serve_one_render(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// This very program, for child processes: the running image even when its file has
/// been replaced by an upgrade since it started.
fn own_program() -> PathBuf {
    let running = PathBuf::from("/proc/self/exe");
    if running.exists() {
        return running;
    }
    std::env::current_exe().unwrap_or(running)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ALLMENDE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,libp2p_mdns=error,libp2p_kad=error,libp2p_autonat=error",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Compute threads when `--threads` is not given: all cores but one, at least one.
/// candle's pool spin-waits, so a thread sharing its core with other work collapses
/// throughput (measured: 55 → 9 tokens/s with two threads and one core busy).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

/// How many times an idle compute thread of a swarm process checks for work before it
/// sleeps, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise. candle's default
/// (25,000) keeps idle threads busy long enough to starve the other processes sharing
/// the cores: measured with `allmende bench` (3 nodes and the client on 2 cores, 2
/// threads each), swarm decode went from 0.60× to 0.87× of one process with 2,000.
/// A single process (`generate --local`) keeps candle's default: there, 2,000 cost
/// about 7%.
const SWARM_SPIN_LIMIT: &str = "2000";

/// Sizes candle's compute pool. Must run before the first tensor operation: candle
/// reads these variables once, when it builds its pool.
pub fn set_compute_threads(threads: usize) {
    let n = threads.max(1).to_string();
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
}

/// Compute threads of a client (`generate`, `chat`): `--threads`, else the default;
/// through the swarm, idle threads sleep sooner, since servers may share the cores.
pub fn client_threads(threads: Option<u16>, local: bool) {
    set_compute_threads(threads.map_or_else(default_threads, usize::from));
    if !local {
        share_cores();
    }
}

/// For processes of a swarm, which often share cores with other nodes or the client:
/// idle compute threads sleep sooner. Must run before the first tensor operation.
pub fn share_cores() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SWARM_SPIN_LIMIT);
    }
}

/// The async runtime for networking, with one worker: model compute runs on its own
/// threads, never on the runtime, and a message costs the runtime about 0.1 ms. With
/// two, every arriving message also woke the second worker: one more context switch
/// per message on cores the swarm's compute threads share (BENCHMARKS.md, step 19).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

/// A byte-counting progress bar on stderr; invisible when stderr is not a terminal.
pub fn loading_bar(message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}
