//! Keeping this server's DHT announcement fresh.
//!
//! Petals refreshes every 120 s with a 240 s expiry, for a world-wide swarm where DHT
//! traffic matters. Allmende swarms are often a LAN or one machine, where a client
//! should see a crashed server disappear in seconds, not minutes; an announcement is
//! ~300 bytes sent to at most 20 peers, so refreshing every 10 s costs little even in a
//! swarm of hundreds. An announcement expires after three missed refreshes (30 s);
//! clients also probe every server they route through, so a dead one is skipped
//! immediately, and a server that leaves gracefully withdraws its records at once.

use std::sync::Arc;
use std::time::Duration;

use crate::network::keys::{model_key, server_key};
use crate::network::Network;

use super::ShardServer;

pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(10);
pub const ANNOUNCE_TTL: Duration = Duration::from_secs(30);
/// How often the announced addresses are compared with the network's.
const ADDRESS_WATCH: Duration = Duration::from_secs(1);

async fn current_addrs(network: &Network) -> Vec<String> {
    match network.reachability().await {
        Ok(reach) => reach.announced.iter().map(|a| a.to_string()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Announces `server` until it begins draining, then withdraws its records at once.
pub async fn announce_loop(server: Arc<ShardServer>, network: Network) {
    let record_key = server_key(&network.peer_id());
    let provider_key = model_key(&server.model);
    if network.start_providing(provider_key.clone()).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(ANNOUNCE_INTERVAL);
    let mut watch = tokio::time::interval(ADDRESS_WATCH);
    let mut announced = Vec::new();
    loop {
        // Announce on schedule, and at once when the addresses change (a relay slot
        // gained or lost), so clients learn where to reach this node.
        let addrs = tokio::select! {
            _ = tick.tick() => current_addrs(&network).await,
            _ = watch.tick() => {
                let addrs = current_addrs(&network).await;
                if addrs == announced {
                    continue;
                }
                addrs
            }
            _ = server.drained() => break,
        };
        if addrs != announced {
            tracing::debug!(?addrs, "announcing new addresses");
        }
        server.set_addrs(addrs.clone());
        announced = addrs;
        let info = server.info();
        match network.sign_announcement(&info) {
            Ok(value) => {
                if network
                    .put_record(record_key.clone(), value, ANNOUNCE_TTL)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => tracing::error!("cannot encode announcement: {e}"),
        }
    }
    let _ = network.stop_providing(provider_key).await;
    let _ = network.remove_record(record_key).await;
}
