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
use crate::network::{Network, NetworkConfig};
use crate::paths;

/// How long to wait for the first peer after dialling the bootstrap addresses.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct SwarmArgs {
    /// Address of a node already in the swarm, e.g. /ip4/127.0.0.1/tcp/4001, with or
    /// without a /p2p/<peer id> suffix; repeat for several.
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
}

/// Starts a node on the swarm and waits until it knows a peer (when it has a way to
/// find one). `identity`: a node's held key, or `None` for a throw-away client identity.
pub async fn join_swarm(
    args: &SwarmArgs,
    identity: Option<Keypair>,
    listen: Vec<Multiaddr>,
    dht_server: bool,
) -> anyhow::Result<Network> {
    let keypair = identity.unwrap_or_else(Keypair::generate_ed25519);
    let swarm_key = args.load_swarm_key()?;
    if swarm_key.is_some() {
        let quic = listen.iter().chain(&args.bootstrap).find(|a| is_quic(a));
        if let Some(addr) = quic {
            bail!("{addr}: QUIC cannot carry a private swarm's key; use a /tcp address");
        }
    }
    let network = Network::start(NetworkConfig {
        keypair,
        swarm_key,
        listen,
        bootstrap: args.bootstrap.clone(),
        mdns: !args.no_mdns,
        dht_server,
    })
    .await?;
    if !args.bootstrap.is_empty() {
        let addrs: Vec<String> = args.bootstrap.iter().map(|a| a.to_string()).collect();
        let hint = match args.is_private() {
            true => "does it hold the same swarm key?",
            false => "if it is a private swarm, pass --swarm-key",
        };
        let what = format!("{} ({hint})", addrs.join(", "));
        network.wait_for_peers(BOOTSTRAP_TIMEOUT, &what).await?;
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
    if args.bootstrap.is_empty() && args.no_mdns {
        bail!("no way to find the swarm: pass --bootstrap ADDR, drop --no-mdns to search the local network, or use --local");
    }
    let network = join_swarm(args, None, Vec::new(), false).await?;
    if args.bootstrap.is_empty() {
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
