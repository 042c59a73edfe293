//! `allmende serve`: host a range of the model's layers for the swarm.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use allmende_protocol::inference::STEP_POSITIONS;
use allmende_protocol::{LayerRange, NUMERICS_VERSION};
use anyhow::{bail, Context};
use clap::Args;
use libp2p::Multiaddr;

use super::gateway::{build_gateway, ApiArgs};
use super::swarm::{join_swarm, model_file, model_target, Joining, SwarmArgs};
use crate::model::kv_cache::bytes_per_position_and_layer;
use crate::model::shard::layer_resident_bytes;
use crate::model::{GgufFile, ModelConfig, Shard};
use crate::network::discovery::discover;
use crate::routing::choose_layers;
use crate::server::memory_plan::{plan, MemoryPlan, Needs};
use crate::server::{announce_loop, measure_throughput, ServerLimits, ShardServer};
use crate::weights::http::RemoteModel;
use crate::weights::{fetch, plan::shard_tensors, Cache, Holding, WeightsServer};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The GGUF model file [default: $ALLMENDE_MODEL, else the fetched SmolLM2 in the cache].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Fetch the layers this node hosts from the swarm instead of reading a model file:
    /// the model's id (64 hex digits, as `allmende status` and every node print it).
    /// Fetched weights are kept in --weights-dir and loaded from there next time.
    #[arg(long, value_name = "ID", conflicts_with = "model")]
    model_id: Option<String>,
    /// With --model-id: the model's GGUF file on an HTTP server that serves byte ranges
    /// (a model hub), for the first of split files `…-00001-of-0000N.gguf`: the node
    /// reads the headers and then only its layers' bytes from there, checking each
    /// chunk against the model's manifest, and asks peers for whatever the server
    /// does not give intact.
    #[arg(long, value_name = "URL", requires = "model_id")]
    model_url: Option<String>,
    /// Where weights fetched from the swarm are kept [default: weights/ in the cache
    /// directory].
    #[arg(long, value_name = "DIR")]
    weights_dir: Option<PathBuf>,
    /// MiB per second this node uploads at most to peers that fetch weights from it.
    #[arg(long, default_value_t = 32, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    max_weights_upload: u32,
    /// Layers to host, as START..END (end exclusive), or `auto` to take the layers the
    /// swarm covers least.
    #[arg(long, default_value = "auto")]
    layers: String,
    /// With `--layers auto`: most layers to host [default: as many as fit in half the
    /// available memory].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_layers: Option<u32>,
    /// Memory this node may use in all, e.g. 2GiB or 800MiB (G and M are powers of
    /// 1000): it hosts only as many layers as fit beside its sessions' KV caches and
    /// what the process itself needs, and says how it split the memory [default: half
    /// the available memory for layers and a quarter for caches].
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<bytesize::ByteSize>,
    /// Address to listen on; repeat for several [default: all interfaces, TCP and QUIC,
    /// on ports chosen by the system].
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<Multiaddr>,
    /// This node's key file, created if missing [default: identity.key in the data
    /// directory].
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Compute threads [default: CPU cores - 1, at least 1].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Most sessions served at once; further clients are told the node is busy.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_sessions: u32,
    /// Most positions one session may hold [default: the model's context length].
    #[arg(long)]
    max_session_len: Option<usize>,
    /// Seconds a session may stay silent before its cache is freed.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
    /// MiB all sessions' KV caches may reserve together [default: a quarter of the
    /// memory available at start].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_cache_mb: Option<u64>,
    /// Sessions one peer may hold at once on this node; trying for more gets it banned
    /// for a while [default: no cap beyond the fair share: one address may hold at
    /// most three quarters of the sessions, and an equal part of them when others
    /// want some too].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_sessions_per_peer: Option<u32>,
    /// Requests per second one peer may send (bursts of twice as many are allowed),
    /// counting everything but steps: steps are paced by their sessions and shared
    /// fairly, and count only when refused. Peers that keep exceeding it, or send
    /// malformed frames, are banned for a while.
    #[arg(long, default_value_t = 200.0)]
    max_requests_per_second: f64,
    /// Most positions one step may carry (a prefill chunk). Clients send prefills in
    /// steps of the protocol's 512 positions, which every server accepts.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(STEP_POSITIONS as i64..))]
    max_step_positions: u32,
    /// On SIGINT/SIGTERM, seconds to keep serving open sessions while clients move
    /// them elsewhere; a second signal exits at once.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Also serve the OpenAI-compatible API and the web page on this address, e.g.
    /// 127.0.0.1:8080.
    #[arg(long)]
    api: Option<std::net::SocketAddr>,
    /// For tests only: announce this numerics version instead of the kernels' own, to
    /// stand in for a server of another release. The computation is unchanged, so a
    /// real node must never set it.
    #[arg(long, hide = true)]
    numerics_version_override: Option<u32>,
    #[command(flatten)]
    api_args: ApiArgs,
    #[command(flatten)]
    reach: ReachArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
}

/// How peers reach this node, and what it relays for others.
#[derive(Args, Debug)]
pub struct ReachArgs {
    /// An address others reach this node at, e.g. a port forwarded on the router
    /// (/ip4/203.0.113.5/tcp/4001); repeat for several. Announced without asking
    /// peers to confirm it.
    #[arg(long = "external-address", value_name = "MULTIADDR")]
    external_address: Vec<Multiaddr>,
    /// Do not relay connections for peers behind NAT. Only publicly reachable nodes
    /// are used as relays; a relay carries their sessions within the limits below.
    #[arg(long)]
    no_relay_service: bool,
    /// Ask the router to forward a port to this node (UPnP IGD).
    #[arg(long)]
    upnp: bool,
    /// Circuits this node relays at once (eight at most for one peer).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    relay_max_circuits: u32,
    /// Seconds one relayed circuit may last; its peers then reconnect (directly if
    /// they can) and move their sessions.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    relay_circuit_secs: u64,
    /// MiB one relayed circuit may carry.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    relay_circuit_mb: u64,
}

impl ReachArgs {
    fn relay_limits(&self) -> Option<crate::network::RelayLimits> {
        (!self.no_relay_service).then(|| crate::network::RelayLimits {
            circuits: self.relay_max_circuits as usize,
            circuits_per_peer: 8,
            circuit_duration: Duration::from_secs(self.relay_circuit_secs),
            circuit_bytes: self.relay_circuit_mb << 20,
            ..Default::default()
        })
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    super::set_compute_threads(
        args.threads
            .map_or_else(super::default_threads, usize::from),
    );
    super::share_cores();
    let runtime = super::runtime()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| crate::paths::data_dir().join("identity.key"));
    // Held until this node exits: no other node may run under its peer id meanwhile.
    let identity = crate::network::identity::hold(&identity)?;
    let joining = Joining {
        identity: Some(identity.keypair.clone()),
        listen: args.listen.clone(),
        dht_server: true,
        relay: args.reach.relay_limits(),
        upnp: args.reach.upnp,
        external: args.reach.external_address.clone(),
        wait: false,
    };
    let network = join_swarm(&args.swarm, joining).await?;
    println!("peer id: {}", network.peer_id());
    tokio::spawn(report_reachability(network.clone()));
    // Let every listener report its address before printing them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addrs = network.listen_addrs().await?;
    for addr in &addrs {
        println!("listening on {addr}");
    }

    let source = match &args.model_id {
        Some(hex) => {
            let root = args
                .weights_dir
                .clone()
                .unwrap_or_else(|| crate::paths::cache_dir().join("weights"));
            Source::fetched(&network, hex, &root, args.model_url.as_deref()).await?
        }
        None => Source::file(args.model.as_deref())?,
    };
    let mut gguf = match &source {
        Source::File { path } => GgufFile::open(path)?,
        Source::Fetched { cache, .. } => cache.gguf()?,
    };
    let model_path = gguf.path().to_path_buf();
    let config = ModelConfig::from_gguf(&gguf)?;
    let (model, model_name) = match &source {
        Source::File { .. } => {
            let target = model_target(&gguf, config.block_count)?;
            (target.id, target.name)
        }
        Source::Fetched { cache, .. } => (
            cache.manifest().id(),
            gguf.string("general.name")
                .unwrap_or("unnamed model")
                .to_string(),
        ),
    };

    println!("model id: {}", model.to_hex());

    let explicit = match args.layers.as_str() {
        "auto" => None,
        text => {
            let range: LayerRange = text.parse()?;
            range.validate(config.block_count as u32)?;
            Some(range)
        }
    };

    let plan = args
        .max_memory
        .map(|cap| memory_plan(cap.as_u64(), &gguf, &config, &args, explicit))
        .transpose()?;
    let range = match explicit {
        Some(range) => range,
        None => {
            let swarm = discover(&network, &model, false).await;
            let served: Vec<(LayerRange, f64)> = swarm
                .iter()
                .map(|s| (s.info.range, s.info.throughput as f64))
                .collect();
            let fit = plan.map_or_else(|| layers_that_fit(&gguf, &config), |p| p.layers);
            let max_layers = args.max_layers.map_or(fit, |n| n.min(fit));
            let range = choose_layers(&served, config.block_count as u32, max_layers);
            tracing::info!("the swarm serves {served:?}; taking layers {range}");
            range
        }
    };

    let weights: u64 = range
        .iter()
        .map(|i| layer_resident_bytes(&gguf, i as usize))
        .sum();
    let holding = match &source {
        Source::File { .. } => Holding::file(&gguf),
        Source::Fetched {
            cache,
            peers,
            remote,
        } => {
            let from = fetch::Sources {
                peers,
                remote: remote.as_ref(),
            };
            fetch_layers(&network, cache, from, range).await?;
            Holding::Cache(cache.clone())
        }
    };
    let bar = super::loading_bar("loading layers");
    let shard = tokio::task::spawn_blocking(move || {
        let shard = Shard::from_gguf(&mut gguf, config, range, &bar);
        bar.finish_and_clear();
        shard
    })
    .await?
    .with_context(|| format!("loading layers {range} of {}", model_path.display()))?;
    let shard = Arc::new(shard);
    let throughput = {
        let shard = shard.clone();
        tokio::task::spawn_blocking(move || measure_throughput(&shard)).await?
    };

    let limits = ServerLimits {
        max_sessions: args.max_sessions as usize,
        max_session_len: args
            .max_session_len
            .unwrap_or(shard.config().context_length),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        max_step_positions: args.max_step_positions as usize,
        peers: crate::server::guard::PeerLimits {
            sessions_per_peer: args
                .max_sessions_per_peer
                .map_or(usize::MAX, |n| n as usize),
            requests_per_second: args.max_requests_per_second.max(0.1),
            burst: 2.0 * args.max_requests_per_second.max(0.5),
            ..Default::default()
        },
        kv_cache_bytes: match (plan, args.max_cache_mb) {
            (Some(plan), _) => plan.kv_cache_bytes,
            (None, Some(mb)) => mb << 20,
            (None, None) => default_kv_budget(),
        },
    };
    if let Some(cap) = args.max_memory {
        println!(
            "memory: layers {range} take {} MiB and sessions' KV caches up to {} MiB, \
             within --max-memory {} MiB",
            weights.div_ceil(1 << 20),
            limits.kv_cache_bytes >> 20,
            cap.as_u64() >> 20
        );
    }
    println!(
        "sessions' KV caches: up to {} MiB",
        limits.kv_cache_bytes >> 20
    );
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let server = ShardServer::new(
        shard,
        model,
        model_name.clone(),
        limits,
        throughput,
        args.numerics_version_override.unwrap_or(NUMERICS_VERSION),
        metrics.clone(),
    );
    server.set_addrs(addrs.iter().map(|a| a.to_string()).collect());
    let accept = tokio::spawn(server.clone().run(network.clone()));
    let weights_server = WeightsServer::new(model, holding, args.max_weights_upload);
    tokio::spawn(weights_server.run(network.clone()));
    tokio::spawn(announce_loop(server.clone(), network.clone()));
    println!(
        "serving layers {range} of {model_name} (model {}, {throughput:.1} tokens/s)",
        model.short()
    );
    if let Some(addr) = args.api {
        let listener = crate::api::bind(addr).await?;
        // The API is a client of the swarm like any other, with its own peer identity:
        // a node cannot open streams to itself, and its own layers are part of routes.
        let own = SwarmArgs {
            bootstrap: addrs.clone(),
            no_mdns: true,
            swarm_key: args.swarm.swarm_key.clone(),
        };
        let client = join_swarm(&own, Joining::client()).await?;
        let Source::File { path } = &source else {
            bail!("--api needs the model file (the client's tokenizer, embedding and head); pass --model");
        };
        let gateway = build_gateway(path, client, metrics, &args.api_args)?;
        let max_connections = args.api_args.max_connections;
        println!("API and web page on http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            if let Err(e) = crate::api::serve(gateway, listener, max_connections).await {
                tracing::error!("the API stopped: {e}");
            }
        });
    }

    let mut signals = Signals::new()?;
    tokio::select! {
        result = accept => {
            result??;
            bail!("the network stopped");
        }
        signal = signals.next() => println!("{signal}: leaving the swarm"),
    }
    // Graceful leave: refuse new sessions and withdraw the announcement at once, keep
    // serving open sessions until their clients have moved them (or the drain time is
    // up), then exit.
    server.begin_drain();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.drain_timeout);
    loop {
        let open = server.open_sessions();
        if open == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                println!("drain time is up; closing {open} sessions");
                break;
            }
            signal = signals.next() => {
                println!("{signal} again: closing {open} sessions now");
                break;
            }
        }
    }
    // Let the DHT withdrawal reach the network before the process ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("stopped");
    Ok(())
}

/// SIGINT and SIGTERM as one stream.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = self.term.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupt"
        }
    }
}

/// A quarter of the memory available now (to this process's control group, if it
/// has a limit).
fn default_kv_budget() -> u64 {
    crate::server::memory_limit::available().map_or(1 << 30, |bytes| bytes / 4)
}

/// Prints each change of this node's reachability, so a donor sees whether peers can
/// reach the node and how.
async fn report_reachability(network: crate::network::Network) {
    use crate::network::reachability::Reachability;
    let mut shown = Reachability::Unknown;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Ok(report) = network.reachability().await else {
            return;
        };
        if report.status == shown {
            continue;
        }
        shown = report.status;
        let addrs: Vec<String> = report.announced.iter().map(|a| a.to_string()).collect();
        let relaying = match report.relay_service && report.status == Reachability::Public {
            true => "; relays for peers behind NAT",
            false => "",
        };
        match report.status {
            Reachability::Unknown => {}
            Reachability::Unreachable => println!("reachability: {}", report.status.describe()),
            _ => println!(
                "reachability: {} at {}{relaying}",
                report.status.describe(),
                addrs.join(", ")
            ),
        }
    }
}

/// Layers and caches under `--max-memory cap`, after what the process holds now and
/// the largest step's activations.
fn memory_plan(
    cap: u64,
    gguf: &GgufFile,
    config: &ModelConfig,
    args: &ServeArgs,
    explicit: Option<LayerRange>,
) -> anyhow::Result<MemoryPlan> {
    let layer = (0..config.block_count)
        .map(|i| layer_resident_bytes(gguf, i))
        .max()
        .unwrap_or(0);
    let needs = Needs {
        cap,
        base: crate::server::memory_limit::resident()
            + step_bytes(config, args.max_step_positions as u64),
        layer,
        layer_count: config.block_count as u32,
        kv_per_position: bytes_per_position_and_layer(config.kv_size()),
        kv_cache: args.max_cache_mb.map(|mb| mb << 20),
    };
    Ok(plan(needs, explicit.map(|r| r.len()))?)
}

/// The activations one step of `positions` positions holds at once in a layer: its
/// input and residual, the normed input, Q/K/V, the attention output and the
/// feed-forward's gate and up with their product, in f32.
fn step_bytes(config: &ModelConfig, positions: u64) -> u64 {
    let d = config.hidden_size as u64;
    let qkv = (config.q_size() + 2 * config.kv_size()) as u64;
    let ff = config.feed_forward_size as u64;
    positions * (3 * d + qkv + config.q_size() as u64 + 3 * ff) * 4
}

/// How many layers fit in half of the memory available now, by what a layer holds
/// once loaded (its largest layer), not its bytes on disk.
fn layers_that_fit(gguf: &GgufFile, config: &ModelConfig) -> u32 {
    let per_layer = (0..config.block_count)
        .map(|i| layer_resident_bytes(gguf, i))
        .max()
        .unwrap_or(0)
        .max(1);
    let available = crate::server::memory_limit::available().unwrap_or(u64::MAX / 4);
    ((available / 2) / per_layer).clamp(1, config.block_count as u64) as u32
}

/// Where a node's weights come from.
enum Source {
    /// A model file on disk.
    File { path: PathBuf },
    /// The swarm: a cache of what this node fetched, and the peers that serve the
    /// model with their layers.
    Fetched {
        cache: Arc<Cache>,
        peers: Vec<(libp2p::PeerId, LayerRange)>,
        /// The model's files on an HTTP server, if given.
        remote: Option<RemoteModel>,
    },
}

impl Source {
    fn file(model: Option<&std::path::Path>) -> anyhow::Result<Self> {
        Ok(Source::File {
            path: model_file(model)?,
        })
    }

    /// The model `hex`'s manifest, from this node's cache or else from a peer that
    /// serves the model, and the cache for its tensors under `root`.
    async fn fetched(
        network: &crate::network::Network,
        hex: &str,
        root: &std::path::Path,
        url: Option<&str>,
    ) -> anyhow::Result<Self> {
        let model = allmende_protocol::ModelId::from_hex(hex)
            .with_context(|| format!("--model-id {hex:?} is not a model id (64 hex digits)"))?;
        // With the manifest cached, the layers may be too: start without peers if
        // none answer soon.
        let stored = Cache::stored_manifest(root, &model);
        let patience = Duration::from_secs(if stored.is_some() { 10 } else { 120 });
        let peers = servers_of(network, &model, patience).await;
        let manifest = match stored {
            Some(manifest) => manifest,
            None if peers.is_empty() => bail!(
                "no peer serves model {} after {} s: nothing to fetch its weights from",
                model.short(),
                patience.as_secs()
            ),
            None => {
                let ids: Vec<libp2p::PeerId> = peers.iter().map(|(p, _)| *p).collect();
                fetch::manifest(network, model, &ids).await?
            }
        };
        let cache = tokio::task::block_in_place(|| Cache::open(root, manifest))?;
        let remote = match url {
            Some(url) => Some(RemoteModel::open(url).await?),
            None => None,
        };
        Ok(Source::Fetched {
            cache: Arc::new(cache),
            peers,
            remote,
        })
    }
}

/// The peers serving `model`, with their layers, once the swarm names some (none if it
/// names none within `patience`).
async fn servers_of(
    network: &crate::network::Network,
    model: &allmende_protocol::ModelId,
    patience: Duration,
) -> Vec<(libp2p::PeerId, LayerRange)> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let found: Vec<_> = discover(network, model, false)
            .await
            .into_iter()
            .map(|s| (s.peer, s.info.range))
            .collect();
        if !found.is_empty() || tokio::time::Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Fetches the tensors of `range` this node does not hold yet, with a progress bar.
async fn fetch_layers(
    network: &crate::network::Network,
    cache: &Arc<Cache>,
    from: fetch::Sources<'_>,
    range: LayerRange,
) -> anyhow::Result<()> {
    let needed = shard_tensors(cache.manifest(), range);
    let total: u64 = needed.iter().map(|t| t.bytes).sum();
    let bar = super::loading_bar("fetching layers");
    let started = std::time::Instant::now();
    let url = from.remote.map(|r| r.url().to_string());
    let fetched = fetch::tensors(network, cache.clone(), &needed, from, &bar).await?;
    bar.finish_and_clear();
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let by_url = match url {
        Some(url) => format!(" and {:.1} MiB from {url}", mib(fetched.by_url)),
        None => String::new(),
    };
    println!(
        "fetched {:.1} MiB of layers {range} ({:.1} MiB held before) from {} peers{by_url} in {:.1} s",
        mib(fetched.bytes),
        mib(total - fetched.bytes.min(total)),
        fetched.by_peer.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
