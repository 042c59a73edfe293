//! `allmende gateway`: the HTTP API and web page for a swarm, hosting no layers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::swarm::{join_as_client, model_file, model_target, SwarmArgs};
use crate::api::{self, Gateway};
use crate::client::ClientModel;
use crate::metrics::Metrics;
use crate::model::GgufFile;
use crate::network::Network;

/// The API flags `gateway` and `serve` share.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Require `Authorization: Bearer KEY` on /v1 requests.
    #[arg(long, env = "ALLMENDE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Generations the API runs at once; further requests get 503.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_concurrent: u32,
    /// Seconds a generation may look for other servers when one fails.
    #[arg(long, default_value_t = 20)]
    pub failover_timeout: u64,
    /// HTTP connections the API keeps open at once; further clients wait to be
    /// accepted. Lowered to half the process's open-files limit if that is smaller.
    #[arg(long, default_value_t = api::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// The GGUF model file [default: $ALLMENDE_MODEL, else the fetched SmolLM2 in the cache].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address for the HTTP API and web page. Loopback by default: exposing it to a
    /// network is a deliberate choice (use --api-key then).
    #[arg(long, default_value = "127.0.0.1:8080")]
    api: SocketAddr,
    /// Compute threads for the embedding and LM head [default: CPU cores - 1].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(flatten)]
    api_args: ApiArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
}

pub fn run(args: GatewayArgs) -> anyhow::Result<()> {
    super::set_compute_threads(
        args.threads
            .map_or_else(super::default_threads, usize::from),
    );
    super::share_cores();
    super::runtime()?.block_on(async {
        let model_path = model_file(args.model.as_deref())?;
        let listener = api::bind(args.api).await?;
        let network = join_as_client(&args.swarm).await?;
        let gateway = build_gateway(
            &model_path,
            network,
            Arc::new(Metrics::new()),
            &args.api_args,
        )?;
        println!("API and web page on http://{}", listener.local_addr()?);
        tokio::select! {
            result = api::serve(gateway, listener, args.api_args.max_connections) => result?,
            _ = tokio::signal::ctrl_c() => println!("stopped"),
        }
        Ok(())
    })
}

/// Loads the client's part of the model and wraps it, with `network`, in a gateway.
pub fn build_gateway(
    model_path: &Path,
    network: Network,
    metrics: Arc<Metrics>,
    args: &ApiArgs,
) -> anyhow::Result<Arc<Gateway>> {
    let mut gguf = GgufFile::open(model_path)?;
    let model = ClientModel::from_gguf(&mut gguf)?;
    let target = model_target(&gguf, model.config.block_count)?;
    let model_name = model_path
        .file_stem()
        .map_or_else(|| target.id.short(), |s| s.to_string_lossy().into_owned());
    Ok(Gateway::new(
        Arc::new(model),
        target,
        model_name,
        network,
        metrics,
        args.api_key.clone(),
        args.max_concurrent as usize,
        Duration::from_secs(args.failover_timeout),
    ))
}
