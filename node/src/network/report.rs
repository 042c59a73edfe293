//! The swarm as a person reads it: servers with their ranges, load and numerics
//! version, per-layer coverage, missing layers. Shared by `allmende status --json` and `GET /api/swarm`.

use allmende_protocol::{LayerRange, ModelId, NUMERICS_VERSION};
use serde_json::{json, Value};

use super::discovery::DiscoveredServer;
use crate::routing::{coverage, missing_ranges};

pub struct SwarmReport {
    pub coverage: Vec<u32>,
    pub missing: Vec<LayerRange>,
    pub json: Value,
}

/// Builds the report of `model` from `servers`. Leaving servers are listed but do not
/// count as coverage.
pub fn swarm_report(
    model: &ModelId,
    name: &str,
    block_count: Option<u32>,
    servers: &[DiscoveredServer],
) -> SwarmReport {
    let ranges: Vec<(LayerRange, f64)> = servers
        .iter()
        .filter(|s| !s.info.draining && !s.silent)
        .map(|s| (s.info.range, s.info.throughput as f64))
        .collect();
    let coverage: Vec<u32> = block_count
        .map(|n| coverage(&ranges, n).iter().map(|c| c.0).collect())
        .unwrap_or_default();
    let missing = block_count
        .map(|n| missing_ranges(ranges.iter().map(|r| r.0), n))
        .unwrap_or_default();
    let peers: Vec<Value> = servers
        .iter()
        .map(|s| {
            json!({
                "peer": s.peer.to_string(),
                "layers": [s.info.range.start, s.info.range.end],
                "throughput": s.info.throughput,
                "numerics_version": s.info.numerics_version,
                "free_sessions": s.info.free_sessions,
                "max_sessions": s.info.max_sessions,
                "rtt_ms": s.rtt_ms,
                "draining": s.info.draining,
                "addrs": s.info.addrs,
                "reachability": reachability(s),
                "path": s.path.map(|p| p.kind),
                "answered": !s.silent,
                "relay_service": s.relays && reachability(s) == "public",
            })
        })
        .collect();
    let json = json!({
        "model": model.to_hex(),
        "model_name": name,
        "block_count": block_count,
        "numerics_version": NUMERICS_VERSION,
        "peers": peers,
        "coverage": coverage,
        "missing": missing.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
    });
    SwarmReport {
        coverage,
        missing,
        json,
    }
}

/// How peers reach a server, from what it announces: a direct address means it is
/// public (its AutoNAT probes confirmed it, or it could not tell yet and announces
/// where it listens), only relayed ones that it is behind NAT; none, or no answer,
/// that it cannot be reached.
fn reachability(server: &DiscoveredServer) -> &'static str {
    use super::reachability::is_relayed;
    let addrs: Vec<libp2p::Multiaddr> = server
        .info
        .addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    if server.silent {
        "unreachable"
    } else if addrs.iter().any(|a| !is_relayed(a)) {
        "public"
    } else if !addrs.is_empty() {
        "behind-nat"
    } else {
        "unreachable"
    }
}
