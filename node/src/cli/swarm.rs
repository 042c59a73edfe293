//! What every swarm-facing command shares: joining the swarm, and finding the model.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::Multiaddr;

use crate::client::connect::ModelTarget;
use crate::model::GgufFile;
use crate::network::{parse_bootstrap_list, Network, NetworkConfig, Services};
use crate::paths;

/// How long a client waits for the first peer (redialling meanwhile); servers wait
/// as long as it takes.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);

/// The public swarm's bootstrap nodes, used when neither `--bootstrap` nor a
/// `bootstrap.txt` in the configuration directory names any.
const DEFAULT_BOOTSTRAP: &str = include_str!("../../bootstrap.txt");

#[derive(Args, Debug, Clone)]
pub struct SwarmArgs {
    /// Address of a node already in the swarm, e.g. /ip4/198.51.100.7/tcp/4001 or
    /// /dns4/node.example.org/tcp/4001, with or without a /p2p/<peer id> suffix;
    /// repeat for several [default: the list in bootstrap.txt in the configuration
    /// directory, else the public swarm's list built in].
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Join a private swarm: the pre-shared key file (from `allmende keygen`) every
    /// member holds. Connections without it fail; QUIC is off.
    #[arg(long, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
}

impl SwarmArgs {
    /// The private swarm's key, if one was given.
    pub fn load_swarm_key(&self) -> anyhow::Result<Option<PreSharedKey>> {
        let Some(path) = &self.swarm_key else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read swarm key {}: {e}", path.display()))?;
        let key = text.parse::<PreSharedKey>().map_err(|e| {
            anyhow::anyhow!(
                "{} is not a swarm key file (/key/swarm/psk/1.0.0/ format): {e}",
                path.display()
            )
        })?;
        Ok(Some(key))
    }

    pub fn is_private(&self) -> bool {
        self.swarm_key.is_some()
    }

    /// The addresses to join through: `--bootstrap`, else the configuration file's,
    /// else the built-in list (which a private swarm never uses).
    pub fn bootstrap_addrs(&self) -> anyhow::Result<Vec<Multiaddr>> {
        if !self.bootstrap.is_empty() {
            return Ok(self.bootstrap.clone());
        }
        let file = paths::config_dir().join("bootstrap.txt");
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                parse_bootstrap_list(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match self.is_private() {
                true => Ok(Vec::new()),
                false => parse_bootstrap_list(DEFAULT_BOOTSTRAP)
                    .map_err(|e| anyhow::anyhow!("the built-in bootstrap list: {e}")),
            },
            Err(e) => bail!("cannot read {}: {e}", file.display()),
        }
    }
}

/// How a node joins: what it offers, where others reach it, and whether to wait for
/// a peer before going on.
pub struct Joining {
    pub identity: Option<Keypair>,
    /// Addresses to listen on [default: all interfaces, ports chosen by the system,
    /// TCP and (outside private swarms) QUIC]. Clients listen too: a dial leaves
    /// from the listening port, which is what lets a NAT's mapping be hole-punched.
    pub listen: Vec<Multiaddr>,
    pub dht_server: bool,
    pub relay: Option<crate::network::RelayLimits>,
    pub upnp: bool,
    pub external: Vec<Multiaddr>,
    /// Fail after `BOOTSTRAP_TIMEOUT` without a peer (clients); servers go on and
    /// keep redialling.
    pub wait: bool,
}

impl Joining {
    pub fn client() -> Self {
        Self {
            identity: None,
            listen: Vec::new(),
            dht_server: false,
            relay: None,
            upnp: false,
            external: Vec::new(),
            wait: true,
        }
    }
}

/// Starts a node on the swarm. A client (`join.wait`) waits until it knows a peer
/// (when it has a way to find one); a server goes on while its network redials.
/// `join.identity`: a node's held key, or `None` for a throw-away client identity.
pub async fn join_swarm(args: &SwarmArgs, join: Joining) -> anyhow::Result<Network> {
    let keypair = join.identity.unwrap_or_else(Keypair::generate_ed25519);
    let swarm_key = args.load_swarm_key()?;
    let bootstrap = args.bootstrap_addrs()?;
    let listen = match (join.listen.is_empty(), swarm_key.is_some()) {
        (true, false) => vec![
            "/ip4/0.0.0.0/tcp/0".parse()?,
            "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
        ],
        (true, true) => vec!["/ip4/0.0.0.0/tcp/0".parse()?],
        (false, _) => join.listen,
    };
    if swarm_key.is_some() {
        let quic = listen.iter().chain(&bootstrap).find(|a| is_quic(a));
        if let Some(addr) = quic {
            bail!("{addr}: QUIC cannot carry a private swarm's key; use a /tcp address");
        }
    }
    let network = Network::start(NetworkConfig {
        keypair,
        swarm_key,
        listen,
        bootstrap: bootstrap.clone(),
        dht_server: join.dht_server,
        services: Services {
            mdns: !args.no_mdns,
            relay: join.relay,
            upnp: join.upnp,
        },
        external: join.external,
    })
    .await?;
    if !bootstrap.is_empty() {
        let addrs: Vec<String> = bootstrap.iter().map(|a| a.to_string()).collect();
        let hint = match args.is_private() {
            true => "does it hold the same swarm key?",
            false => "if it is a private swarm, pass --swarm-key",
        };
        let what = format!("{} ({hint})", addrs.join(", "));
        match join.wait {
            true => network.wait_for_peers(BOOTSTRAP_TIMEOUT, &what).await?,
            false => {
                let waiting = network.clone();
                tokio::spawn(async move {
                    let patience = Duration::from_secs(2);
                    if waiting.wait_for_peers(patience, &what).await.is_err() {
                        tracing::warn!(
                            "no peer reachable yet at {what}; serving meanwhile and dialling again"
                        );
                        let forever = Duration::from_secs(u32::MAX.into());
                        if waiting.wait_for_peers(forever, &what).await.is_ok() {
                            tracing::info!("joined the swarm");
                        }
                    }
                });
            }
        }
    }
    Ok(network)
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| {
        matches!(
            p,
            libp2p::multiaddr::Protocol::QuicV1 | libp2p::multiaddr::Protocol::Quic
        )
    })
}

/// A client needs some way into a swarm: a bootstrap address or mDNS.
pub async fn join_as_client(args: &SwarmArgs) -> anyhow::Result<Network> {
    let no_bootstrap = args.bootstrap_addrs()?.is_empty();
    if no_bootstrap && args.no_mdns {
        bail!("no way to find the swarm: pass --bootstrap ADDR, drop --no-mdns to search the local network, or use --local");
    }
    let network = join_swarm(args, Joining::client()).await?;
    if no_bootstrap {
        network
            .wait_for_peers(BOOTSTRAP_TIMEOUT, "the local network (mDNS)")
            .await?;
    }
    Ok(network)
}

/// The model file to use: `--model`, else the default, which must exist.
pub fn model_file(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = model.map_or_else(paths::default_model, Path::to_path_buf);
    if !path.exists() {
        bail!(
            "model file {} not found; fetch it with scripts/fetch-model.sh, or pass --model PATH",
            path.display()
        );
    }
    Ok(path)
}

/// What the swarm knows the model by: its content hash (with a progress bar the first
/// time a file is hashed), its name, and its layer count.
pub fn model_target(gguf: &GgufFile, block_count: usize) -> anyhow::Result<ModelTarget> {
    let bar = super::loading_bar("hashing model");
    let id = crate::model::model_id(gguf.path(), &bar)?;
    bar.finish_and_clear();
    Ok(ModelTarget {
        id,
        name: gguf
            .string("general.name")
            .unwrap_or("unnamed model")
            .to_string(),
        block_count: block_count as u32,
    })
}
