//! `allmende status`: who serves which layers of a model, and what is missing.

use std::path::PathBuf;

use allmende_protocol::{ModelId, NUMERICS_VERSION};
use anyhow::bail;
use clap::Args;

use super::swarm::{join_as_client, model_file, SwarmArgs};
use crate::model::{GgufFile, ModelConfig};
use crate::network::discovery::{discover_with, Probe};
use crate::network::report::swarm_report;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The model to report on, by its GGUF file [default: $ALLMENDE_MODEL, else the
    /// fetched SmolLM2 in the cache].
    #[arg(long, conflicts_with = "model_id")]
    model: Option<PathBuf>,
    /// The model to report on, by its id (64 hex digits), without a local file.
    #[arg(long)]
    model_id: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    swarm: SwarmArgs,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    super::runtime()?.block_on(status(args))
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (model, local_blocks, local_name) = match &args.model_id {
        Some(hex) => match ModelId::from_hex(hex) {
            Some(id) => (id, None, None),
            None => bail!("--model-id must be 64 hexadecimal digits"),
        },
        None => {
            let path = model_file(args.model.as_deref())?;
            let gguf = GgufFile::open(&path)?;
            let config = ModelConfig::from_gguf(&gguf)?;
            let name = gguf.string("general.name").ok().map(String::from);
            let id = crate::model::model_id(&path, &indicatif::ProgressBar::hidden())?;
            (id, Some(config.block_count as u32), name)
        }
    };
    let network = join_as_client(&args.swarm).await?;
    let servers = discover_with(&network, &model, Probe::All).await;
    let block_count = local_blocks.or_else(|| servers.first().map(|s| s.info.block_count));
    let name = local_name
        .or_else(|| servers.first().map(|s| s.info.model_name.clone()))
        .unwrap_or_else(|| "unknown model".into());
    let report = swarm_report(&model, &name, block_count, &servers);
    if args.json {
        println!("{}", report.json);
        return Ok(());
    }
    let (cover, missing) = (report.coverage, report.missing);
    println!("model {name} ({})", model.short());
    match block_count {
        Some(n) => println!(
            "{n} layers, {} servers; this node's numerics version {NUMERICS_VERSION}",
            servers.len()
        ),
        None => println!("no servers found, and no local model file to tell its layers"),
    }
    for s in &servers {
        println!(
            "  {}  layers {:>9}  {:6.1} tok/s  numerics {}{}  sessions {}/{} free  rtt {}  {}{}",
            s.peer,
            s.info.range.to_string(),
            s.info.throughput,
            s.info.numerics_version,
            if s.info.numerics_version == NUMERICS_VERSION {
                ""
            } else {
                " (not this node's)"
            },
            s.info.free_sessions,
            s.info.max_sessions,
            s.rtt_ms.map_or("?".into(), |r| format!("{r:.2} ms")),
            reach_text(s),
            if s.info.draining { "  (leaving)" } else { "" },
        );
    }
    if !cover.is_empty() {
        let bar: String = cover
            .iter()
            .map(|&c| match c {
                0 => '.',
                n @ 1..=9 => char::from_digit(n, 10).unwrap_or('+'),
                _ => '+',
            })
            .collect();
        println!("coverage (servers per layer): [{bar}]");
    }
    match missing.is_empty() {
        true if block_count.is_some() => println!("all layers are served"),
        true => {}
        false => {
            let list: Vec<String> = missing.iter().map(|r| r.to_string()).collect();
            println!("missing layers: {}", list.join(", "));
        }
    }
    Ok(())
}

/// Whether a server answered, and by which path.
fn reach_text(s: &crate::network::discovery::DiscoveredServer) -> String {
    use crate::network::PathKind;
    let relayed = s.info.addrs.iter().any(|a| a.contains("/p2p-circuit"));
    match (s.silent, s.path.map(|p| p.kind)) {
        (true, _) if s.info.addrs.is_empty() => "unreachable (announces no address)".into(),
        (true, _) => "did not answer".into(),
        (_, Some(PathKind::Relayed)) => "behind NAT, relayed".into(),
        (_, Some(PathKind::HolePunched)) => "behind NAT, hole-punched".into(),
        _ if relayed => "behind NAT".into(),
        _ if s.relays => "direct, relays for peers behind NAT".into(),
        _ => "direct".into(),
    }
}
