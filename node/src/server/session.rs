//! A stream's open session: its KV cache, what admission gave it, and how steps run on
//! it. Every step of a message is checked against the session before any is computed;
//! then they run in order on the compute worker, the first replacing whatever the
//! cache held from its position on.

use allmende_protocol::{ErrorKind, WireDType, WireTensor};
use candle_core::{Device, Tensor};
use tokio::sync::mpsc;

use super::admission::{Admitted, Tickets};
use super::forwarding::ForwardedStep;
use super::reply::{Refusal, Reply};
use super::share::PeerGroup;
use super::ShardServer;
use crate::model::{ForwardError, ShardCache};

pub struct OpenSession {
    pub id: u64,
    dtype: WireDType,
    /// `None` only if the compute worker died holding it.
    cache: Option<ShardCache>,
    /// Steps forwarded into the session by the previous server of its route.
    inbox: mpsc::Receiver<ForwardedStep>,
    /// The id of the last step computed; forwarded steps must be newer.
    pub last_step: Option<u64>,
    _tickets: Tickets,
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        // Only a session that held a KV cache freed enough to be worth a trim: a
        // refused `Open` frees nothing.
        super::memory::session_ended();
    }
}

impl OpenSession {
    pub(super) fn new(admitted: Admitted, dtype: WireDType) -> Self {
        Self {
            id: admitted.id,
            dtype,
            cache: Some(admitted.cache),
            inbox: admitted.inbox,
            last_step: None,
            _tickets: admitted.tickets,
        }
    }

    /// Positions the session holds (`None` if it lost its cache).
    pub fn len(&self) -> Option<usize> {
        self.cache.as_ref().map(ShardCache::len)
    }

    /// The next step forwarded into the session.
    pub async fn next_forwarded(&mut self) -> Option<ForwardedStep> {
        self.inbox.recv().await
    }

    /// Checks `steps`, starting at `position`, against the session before any is
    /// computed, and decodes them.
    pub fn validate(
        &self,
        server: &ShardServer,
        position: u32,
        steps: Vec<WireTensor<'_>>,
    ) -> Result<Vec<Tensor>, Refusal> {
        let cache = self.cache.as_ref().ok_or_else(lost_cache)?;
        if steps.is_empty() {
            return Err((ErrorKind::BadRequest, "no hidden states to process".into()));
        }
        if position as usize > cache.len() {
            let msg = format!(
                "step at position {position}, but the session has {} positions",
                cache.len()
            );
            return Err((ErrorKind::BadRequest, msg));
        }
        let hidden_size = server.shard.config().hidden_size;
        let max_step = server.limits.max_step_positions;
        let mut total = 0usize;
        let mut inputs = Vec::with_capacity(steps.len());
        for step in steps {
            // One sequence per session: clients batch by opening sessions, which the KV
            // budget, the session limits and the compute queue all count.
            let seq = match step.shape.as_slice() {
                &[1, s, h] if s > 0 && h as usize == hidden_size => s as usize,
                shape => {
                    let msg = format!(
                        "hidden states have shape {shape:?}; expected [1, seq, {hidden_size}]"
                    );
                    return Err((ErrorKind::BadTensor, msg));
                }
            };
            if seq > max_step {
                let msg =
                    format!("a step of {seq} positions exceeds this server's limit of {max_step}");
                return Err((ErrorKind::TooLong, msg));
            }
            total = total.saturating_add(seq);
            if position as usize + total > cache.max_len() {
                let msg = format!(
                    "{total} more positions would exceed the session's maximum of {}",
                    cache.max_len()
                );
                return Err((ErrorKind::TooLong, msg));
            }
            // The values were decoded from the frame; they move into the tensor uncopied.
            let values = step
                .to_f32()
                .map_err(|e| (ErrorKind::BadTensor, e.to_string()))?;
            let tensor = Tensor::from_vec(values, (1, seq, hidden_size), &Device::Cpu)
                .map_err(|e| (ErrorKind::BadTensor, e.to_string()))?;
            inputs.push(tensor);
        }
        Ok(inputs)
    }

    /// Computes `inputs` (checked by [`Self::validate`]) in order from `position`, as
    /// the client's step `step`, and replies with their outputs concatenated along the
    /// sequence axis. What the session held from `position` on is replaced.
    pub async fn compute(
        &mut self,
        server: &ShardServer,
        group: PeerGroup,
        step: u64,
        position: u32,
        inputs: Vec<Tensor>,
    ) -> Result<Reply, Refusal> {
        let mut cache = self.cache.take().ok_or_else(lost_cache)?;
        cache.truncate(position as usize);
        self.last_step = Some(step);
        let mut outputs = Vec::with_capacity(inputs.len());
        for input in inputs {
            let positions = input.dim(1).unwrap_or(0) as u64;
            let started = std::time::Instant::now();
            // A worker that died took the cache with it: the session stays without.
            let (back, result) = match server.compute.run(group, input, cache).await {
                Ok(done) => done,
                Err(e) => return Err((ErrorKind::Internal, e.to_string())),
            };
            cache = back;
            server.metrics.steps.inc();
            server.metrics.positions.inc_by(positions);
            server
                .metrics
                .step_seconds
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(out) => outputs.push(out),
                Err(e) => {
                    self.cache = Some(cache);
                    return Err((forward_error_kind(&e), e.to_string()));
                }
            }
        }
        self.cache = Some(cache);
        let internal = |e: String| (ErrorKind::Internal, e);
        // A plain step (the common case) needs no concatenation copy.
        let output = match outputs.len() {
            1 => outputs.swap_remove(0),
            _ => Tensor::cat(&outputs, 1).map_err(|e| internal(e.to_string()))?,
        };
        Ok(Reply::Hidden {
            step,
            position,
            output,
            dtype: self.dtype,
            draining: server.is_draining(),
            forwarded: None,
        })
    }
}

fn lost_cache() -> Refusal {
    (ErrorKind::Internal, "the session lost its cache".into())
}

fn forward_error_kind(e: &ForwardError) -> ErrorKind {
    match e {
        ForwardError::ContextFull { .. } => ErrorKind::TooLong,
        ForwardError::Shape { .. } | ForwardError::Batch { .. } => ErrorKind::BadTensor,
        _ => ErrorKind::Internal,
    }
}
