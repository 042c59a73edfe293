//! Fetching weights from peers: the manifest (checked against the model id), then the
//! chunks of the tensors this node needs, several at once and from several peers, each
//! checked against its hash before it is stored. A peer that sends a chunk that does
//! not match is banned and the chunk fetched from another.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allmende_protocol::manifest::{TensorEntry, CHUNK_BYTES};
use allmende_protocol::weights::{WeightsReply, WeightsRequest};
use allmende_protocol::{LayerRange, Manifest, ModelId, MAX_MESSAGE_BYTES};
use futures::StreamExt;
use indicatif::ProgressBar;
use libp2p::PeerId;

use super::cache::{Cache, CacheError};
use super::http::RemoteModel;
use super::plan::{layer_of, sources};
use super::serve::ask;
use crate::network::Network;

/// Chunks in flight at once.
const PARALLEL: usize = 4;
/// How long one chunk may take to arrive.
const CHUNK_PATIENCE: Duration = Duration::from_secs(60);
/// How long a manifest may take (the largest are tens of MiB, hashed on first ask).
const MANIFEST_PATIENCE: Duration = Duration::from_secs(300);
/// Rounds over every peer before a chunk nobody gives is an error (peers may be busy).
const ROUNDS: u32 = 5;
/// How long a peer that sent a chunk that does not match the model is banned.
const BAN: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no peer gave the manifest of model {model}{}", why_tried(.tried))]
    NoManifest { model: String, tried: Vec<String> },
    #[error("no peer gave chunk {index} of tensor {tensor}{}", why_tried(.tried))]
    NoChunk {
        tensor: String,
        index: u32,
        tried: Vec<String>,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

fn why_tried(why: &[String]) -> String {
    match why.is_empty() {
        true => " (no peer serves it)".into(),
        false => format!(": {}", why.join("; ")),
    }
}

/// What a fetch did.
#[derive(Debug, Default)]
pub struct Fetched {
    pub bytes: u64,
    /// Bytes each peer sent that were kept.
    pub by_peer: HashMap<PeerId, u64>,
    /// Bytes the model's HTTP server sent that were kept.
    pub by_url: u64,
}

/// The manifest of `model` from the first of `peers` that sends one whose hash is the
/// id; a peer that sends another is banned.
pub async fn manifest(
    network: &Network,
    model: ModelId,
    peers: &[PeerId],
) -> Result<Manifest, FetchError> {
    let mut tried = Vec::new();
    let request = WeightsRequest::Manifest { model };
    for &peer in peers {
        match ask(
            network,
            peer,
            &request,
            MAX_MESSAGE_BYTES,
            MANIFEST_PATIENCE,
        )
        .await
        {
            Ok(WeightsReply::Manifest(bytes)) => match Manifest::decode(&bytes) {
                Ok(manifest) if manifest.id() == model => return Ok(manifest),
                _ => {
                    tracing::warn!(%peer, "sent a manifest that is not model {}; banned", model.short());
                    let _ = network.ban(peer, BAN).await;
                    tried.push(format!("{peer} sent another model's manifest"));
                }
            },
            Ok(other) => tried.push(format!("{peer}: {other:?}")),
            Err(e) => tried.push(format!("{peer}: {e}")),
        }
    }
    Err(FetchError::NoManifest {
        model: model.short(),
        tried,
    })
}

/// Where chunks come from: the peers serving the model (each with the layers it
/// serves), and the model's files on an HTTP server, asked first while they match.
pub struct Sources<'a> {
    pub peers: &'a [(PeerId, LayerRange)],
    pub remote: Option<&'a RemoteModel>,
}

/// Fetches into `cache` every chunk of `tensors` it lacks; `progress` counts bytes.
pub async fn tensors(
    network: &Network,
    cache: Arc<Cache>,
    tensors: &[&TensorEntry],
    from: Sources<'_>,
    progress: &ProgressBar,
) -> Result<Fetched, FetchError> {
    let peers = from.peers;
    let remote_ok = std::sync::atomic::AtomicBool::new(from.remote.is_some());
    let remote_ok = &remote_ok;
    let model = cache.manifest().id();
    let jobs: Vec<(&TensorEntry, u32)> = tensors
        .iter()
        .flat_map(|&t| (0..t.chunks.len() as u32).map(move |i| (t, i)))
        .filter(|(t, i)| !cache.holds(&t.name, *i))
        .collect();
    progress.set_length(jobs.iter().map(|(t, i)| chunk_len(t, *i)).sum());
    let report = Arc::new(Mutex::new(Fetched::default()));
    // Watched, so that requests in flight to a peer end when it is banned.
    let banned = Arc::new(tokio::sync::watch::Sender::new(HashSet::<PeerId>::new()));
    let mut results = futures::stream::iter(jobs.into_iter().enumerate())
        .map(|(n, (entry, index))| {
            let (cache, report, banned) = (cache.clone(), report.clone(), banned.clone());
            async move {
                let from_url = match from.remote {
                    Some(remote) if remote_ok.load(std::sync::atomic::Ordering::Relaxed) => {
                        from_remote(remote, entry, index, remote_ok).await
                    }
                    _ => None,
                };
                let (peer, bytes) = match from_url {
                    Some(bytes) => (None, bytes),
                    None => {
                        let order = sources(layer_of(&entry.name), peers, n);
                        let (peer, bytes) =
                            one_chunk(network, model, entry, index, &order, &banned).await?;
                        (Some(peer), bytes)
                    }
                };
                let len = bytes.len() as u64;
                let name = entry.name.clone();
                tokio::task::spawn_blocking(move || cache.put(&name, index, &bytes))
                    .await
                    .map_err(|e| CacheError::Io {
                        path: "tensors".into(),
                        source: std::io::Error::other(e.to_string()),
                    })??;
                progress.inc(len);
                let mut report = report.lock().unwrap_or_else(|e| e.into_inner());
                report.bytes += len;
                match peer {
                    Some(peer) => *report.by_peer.entry(peer).or_default() += len,
                    None => report.by_url += len,
                }
                Ok::<_, FetchError>(())
            }
        })
        .buffer_unordered(PARALLEL);
    while let Some(result) = results.next().await {
        result?;
    }
    drop(results);
    cache.sync()?;
    let report = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(report)
}

/// Chunk `index` of `entry` from the model's HTTP server, if it sends it intact; a
/// chunk that does not match stops all further use of the server.
async fn from_remote(
    remote: &RemoteModel,
    entry: &TensorEntry,
    index: u32,
    ok: &std::sync::atomic::AtomicBool,
) -> Option<Vec<u8>> {
    match remote
        .tensor_range(&entry.name, entry.chunk_range(index as usize))
        .await
    {
        Some(Ok(bytes)) if entry.verify_chunk(index as usize, &bytes) => Some(bytes),
        Some(Ok(_)) | None => {
            if ok.swap(false, std::sync::atomic::Ordering::Relaxed) {
                println!(
                    "{} is not this model (its chunk {index} of {} differs or is missing): \
                     fetching from peers only",
                    remote.url(),
                    entry.name
                );
            }
            None
        }
        Some(Err(e)) => {
            tracing::warn!("chunk {index} of {} from {}: {e}", entry.name, remote.url());
            None
        }
    }
}

fn chunk_len(entry: &TensorEntry, index: u32) -> u64 {
    let range = entry.chunk_range(index as usize);
    range.end - range.start
}

/// Chunk `index` of `entry` from the first peer in `order` that sends it intact.
async fn one_chunk(
    network: &Network,
    model: ModelId,
    entry: &TensorEntry,
    index: u32,
    order: &[PeerId],
    banned: &tokio::sync::watch::Sender<HashSet<PeerId>>,
) -> Result<(PeerId, Vec<u8>), FetchError> {
    let request = WeightsRequest::Chunk {
        model,
        tensor: entry.name.clone(),
        index,
    };
    let max_reply = CHUNK_BYTES as usize + 64;
    let mut tried = Vec::new();
    for round in 0..ROUNDS {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(500 << round.min(4))).await;
        }
        tried.clear();
        for &peer in order {
            if banned.borrow().contains(&peer) {
                continue;
            }
            let mut watch = banned.subscribe();
            let answer = tokio::select! {
                answer = ask(network, peer, &request, max_reply, CHUNK_PATIENCE) => answer,
                _ = watch.wait_for(|set| set.contains(&peer)) => continue,
            };
            match answer {
                Ok(WeightsReply::Chunk(bytes)) if entry.verify_chunk(index as usize, &bytes) => {
                    return Ok((peer, bytes));
                }
                Ok(WeightsReply::Chunk(_)) => {
                    tracing::warn!(
                        %peer,
                        "sent chunk {index} of {} that does not match the model; banned",
                        entry.name
                    );
                    println!(
                        "banned {peer}: it sent chunk {index} of {} that does not match the model",
                        entry.name
                    );
                    banned.send_modify(|set| {
                        set.insert(peer);
                    });
                    let _ = network.ban(peer, BAN).await;
                    tried.push(format!("{peer} sent a chunk that does not match"));
                }
                Ok(other) => tried.push(format!("{peer}: {other:?}")),
                Err(e) => tried.push(format!("{peer}: {e}")),
            }
        }
    }
    Err(FetchError::NoChunk {
        tensor: entry.name.clone(),
        index,
        tried,
    })
}
