//! Answering peers that fetch weights: the manifest and chunks of the tensors this node
//! holds, from its model file or its cache. Uploads share a rate limit and a few
//! streams, of which the peers at one address hold at most a quarter, so serving
//! weights never takes more than a set share of the node's network and one address
//! cannot keep others from fetching; the disk reads run off the async runtime.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use allmende_protocol::manifest::CHUNK_BYTES;
use allmende_protocol::weights::{WeightsReply, WeightsRequest, MAX_REQUEST_BYTES};
use allmende_protocol::ModelId;
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use libp2p::{PeerId, Stream};
use tokio::sync::{OnceCell, Semaphore};

use super::cache::Cache;
use crate::model::GgufFile;
use crate::network::framing::{read_message, write_message, FrameIoError};
use crate::network::{Network, NetworkError, WEIGHTS_PROTOCOL};

/// Weights streams served at once; more are told `Busy`.
const STREAMS: usize = 16;
/// Of those, what the peers at one address may hold (a fetching donor keeps four
/// requests in flight).
const STREAMS_PER_ADDRESS: usize = 4;
/// How long a weights stream may stay silent before its next request.
const IDLE: Duration = Duration::from_secs(10);

/// What this node serves weights from.
pub enum Holding {
    /// The whole model file: every tensor.
    File {
        path: PathBuf,
        /// Each tensor's start in the file and its length.
        table: HashMap<String, (u64, u64)>,
    },
    /// The chunks this node fetched.
    Cache(Arc<Cache>),
}

impl Holding {
    pub fn file(gguf: &GgufFile) -> Self {
        let table = gguf
            .tensor_names()
            .filter_map(|name| {
                let start = gguf.tensor_start(name)?;
                Some((name.to_string(), (start, gguf.tensor_bytes(name))))
            })
            .collect();
        Holding::File {
            path: gguf.path().to_path_buf(),
            table,
        }
    }
}

pub struct WeightsServer {
    model: ModelId,
    holding: Holding,
    /// The encoded manifest, made when a peer first asks for it (from a whole file,
    /// by hashing it).
    manifest: OnceCell<Arc<Vec<u8>>>,
    /// Upload budget in KiB.
    upload: DefaultDirectRateLimiter,
    /// The most KiB the budget gives at once.
    burst_kib: u32,
    streams: Arc<Semaphore>,
    /// Open streams by the peer's address.
    by_address: Arc<std::sync::Mutex<HashMap<Option<std::net::IpAddr>, usize>>>,
}

/// A stream's place in the per-address count, given back when it ends.
struct AddressSlot {
    counts: Arc<std::sync::Mutex<HashMap<Option<std::net::IpAddr>, usize>>>,
    address: Option<std::net::IpAddr>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

impl WeightsServer {
    /// Serves `model`'s weights from `holding` at most `mib_per_s` MiB/s.
    pub fn new(model: ModelId, holding: Holding, mib_per_s: u32) -> Arc<Self> {
        let kib = NonZeroU32::new(mib_per_s.max(1).saturating_mul(1024)).unwrap_or(NonZeroU32::MIN);
        // Bursts of one chunk at most: over any second, the rate is kept.
        let chunk_kib = NonZeroU32::new((CHUNK_BYTES / 1024) as u32).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(kib).allow_burst(chunk_kib.min(kib));
        Arc::new(Self {
            model,
            holding,
            manifest: OnceCell::new(),
            upload: RateLimiter::direct(quota),
            burst_kib: chunk_kib.min(kib).get(),
            streams: Arc::new(Semaphore::new(STREAMS)),
            by_address: Default::default(),
        })
    }

    /// Accepts weights streams until the network stops.
    pub async fn run(self: Arc<Self>, network: Network) -> Result<(), NetworkError> {
        let mut incoming = network.accept_protocol(WEIGHTS_PROTOCOL)?;
        while let Some((peer, mut stream)) = incoming.next().await {
            let address = network.address_of(&peer);
            let slots = self
                .streams
                .clone()
                .try_acquire_owned()
                .ok()
                .zip(self.address_slot(address));
            let Some(slots) = slots else {
                tokio::spawn(async move {
                    let _ = write_message(&mut stream, &WeightsReply::Busy).await;
                });
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                if let Err(e) = server.serve_stream(stream).await {
                    tracing::debug!(%peer, "weights stream ended: {e}");
                }
                drop(slots);
            });
        }
        Ok(())
    }

    /// A place for one more stream from `address`, if it holds fewer than its share.
    fn address_slot(&self, address: Option<std::net::IpAddr>) -> Option<AddressSlot> {
        let mut counts = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(address).or_default();
        if *n >= STREAMS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: self.by_address.clone(),
            address,
        })
    }

    async fn serve_stream(&self, mut stream: Stream) -> Result<(), FrameIoError> {
        loop {
            let request = match tokio::time::timeout(
                IDLE,
                read_message::<WeightsRequest, _>(&mut stream, MAX_REQUEST_BYTES),
            )
            .await
            {
                Ok(Err(FrameIoError::Closed)) | Err(_) => return Ok(()),
                Ok(request) => request?,
            };
            let reply = self.answer(request).await;
            if let WeightsReply::Chunk(bytes) | WeightsReply::Manifest(bytes) = &reply {
                self.pace(bytes.len()).await;
            }
            write_message(&mut stream, &reply).await?;
        }
    }

    /// Waits until the upload budget allows `bytes` more.
    async fn pace(&self, bytes: usize) {
        let mut kib = bytes.div_ceil(1024) as u32;
        while kib > 0 {
            let part = kib.min(self.burst_kib);
            if let Some(n) = NonZeroU32::new(part) {
                // Within the burst by construction.
                let _ = self.upload.until_n_ready(n).await;
            }
            kib -= part;
        }
    }

    async fn answer(&self, request: WeightsRequest) -> WeightsReply {
        match request {
            WeightsRequest::Manifest { model } if model == self.model => {
                match self.manifest().await {
                    Some(bytes) => WeightsReply::Manifest(bytes.to_vec()),
                    None => WeightsReply::NotHeld,
                }
            }
            WeightsRequest::Chunk {
                model,
                tensor,
                index,
            } if model == self.model => self.chunk(tensor, index).await,
            _ => WeightsReply::NotHeld,
        }
    }

    async fn manifest(&self) -> Option<Arc<Vec<u8>>> {
        let made = self.manifest.get_or_try_init(|| async {
            match &self.holding {
                Holding::Cache(cache) => Ok(Arc::new(cache.manifest().encode())),
                Holding::File { path, .. } => {
                    let path = path.clone();
                    let made = tokio::task::spawn_blocking(move || {
                        let bar = indicatif::ProgressBar::hidden();
                        crate::model::manifest(&GgufFile::open(&path)?, &bar)
                    })
                    .await
                    .map_err(|_| ())?
                    .map_err(|e| tracing::warn!("cannot hash the model file: {e}"))?;
                    // The file changed since its id was taken: serve none of it.
                    (made.id() == self.model)
                        .then(|| Arc::new(made.encode()))
                        .ok_or(())
                }
            }
        });
        made.await.ok().cloned()
    }

    async fn chunk(&self, tensor: String, index: u32) -> WeightsReply {
        let read = match &self.holding {
            Holding::Cache(cache) => {
                let cache = cache.clone();
                tokio::task::spawn_blocking(move || cache.chunk(&tensor, index)).await
            }
            Holding::File { path, table, .. } => {
                let Some(&(start, len)) = table.get(&tensor) else {
                    return WeightsReply::NotHeld;
                };
                let from = index as u64 * CHUNK_BYTES;
                if from >= len {
                    return WeightsReply::NotHeld;
                }
                let size = (len - from).min(CHUNK_BYTES) as usize;
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; size];
                    let file = std::fs::File::open(path).ok()?;
                    file.read_exact_at(&mut buf, start + from).ok()?;
                    Some(buf)
                })
                .await
            }
        };
        match read {
            Ok(Some(bytes)) => WeightsReply::Chunk(bytes),
            _ => WeightsReply::NotHeld,
        }
    }
}

/// Asks `peer` one weights request on a fresh stream, waiting at most `patience`.
pub async fn ask(
    network: &Network,
    peer: PeerId,
    request: &WeightsRequest,
    max_reply: usize,
    patience: Duration,
) -> Result<WeightsReply, String> {
    let exchange = async {
        let mut stream = network
            .open_stream_of(peer, WEIGHTS_PROTOCOL)
            .await
            .map_err(|e| e.to_string())?;
        write_message(&mut stream, request)
            .await
            .map_err(|e| e.to_string())?;
        read_message::<WeightsReply, _>(&mut stream, max_reply)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(patience, exchange)
        .await
        .map_err(|_| format!("no answer within {} s", patience.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_its_share_of_the_streams() {
        let holding = Holding::File {
            path: PathBuf::new(),
            table: HashMap::new(),
        };
        let server = WeightsServer::new(ModelId([0; 32]), holding, 32);
        let (a, b) = (Some([10, 0, 0, 1].into()), Some([10, 0, 0, 2].into()));
        let mut held: Vec<AddressSlot> = (0..STREAMS_PER_ADDRESS)
            .map(|_| server.address_slot(a).unwrap())
            .collect();
        assert!(server.address_slot(a).is_none());
        assert!(server.address_slot(b).is_some());
        held.pop();
        assert!(server.address_slot(a).is_some());
    }
}
