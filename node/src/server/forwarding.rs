//! Server-to-server forwarding: a step's output goes straight to the next server of
//! the client's route instead of back through the client first (see the protocol's
//! `inference` module).
//!
//! Receiving: every open session has an [`Inbox`] in the server's [`Inboxes`], under
//! its id and the random token handed to its client; a `Forwarded` step that names
//! the session and carries the client's proof for its sender, step and position is
//! delivered to the session's stream task, which computes it and answers the client.
//! Sending: a session's [`Forwarder`] keeps one stream to the server it last
//! forwarded to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allmende_protocol::inference::{
    forward_proof, ForwardLink, ForwardProof, LinkKind, NextHop, SessionToken, TOKEN_BYTES,
};
use allmende_protocol::{encode_frame, ClientMessage, WireDType, WireTensor};
use candle_core::Tensor;
use libp2p::{PeerId, Stream};
use rand::TryRngCore;
use tokio::sync::mpsc;

use crate::model::with_values;
use crate::network::framing::write_frame;
use crate::network::Network;

/// Forwarded steps a session holds before more are refused: a client waits for each
/// step's outputs before it sends the next, so one is the most a route delivers.
const INBOX_CAPACITY: usize = 2;
/// Longest wait to reach the next server and hand it a step; past it the client is
/// told the step was not forwarded and sends it itself.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// A step forwarded into a session by the previous server of its route.
pub struct ForwardedStep {
    /// The client's id for the step.
    pub step: u64,
    pub position: u32,
    pub hidden: WireTensor<'static>,
    pub forward: Vec<NextHop>,
}

/// Why a forwarded step was not delivered.
#[derive(Debug, PartialEq, Eq)]
pub enum Undelivered {
    /// No such session (it may just have closed).
    UnknownSession,
    /// The proof does not match: the client never let the sender forward this step.
    BadProof,
    /// The session already holds as many forwarded steps as a route can send it.
    Full,
}

struct Inbox {
    token: SessionToken,
    sender: mpsc::Sender<ForwardedStep>,
}

/// The inboxes of a server's open sessions.
#[derive(Clone, Default)]
pub struct Inboxes(Arc<Mutex<HashMap<u64, Inbox>>>);

impl Inboxes {
    /// Gives session `id` an inbox under a fresh random token. The inbox is removed
    /// when the returned [`Registration`] is dropped.
    pub fn register(
        &self,
        id: u64,
    ) -> std::io::Result<(Registration, mpsc::Receiver<ForwardedStep>, SessionToken)> {
        let mut token = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng
            .try_fill_bytes(&mut token)
            .map_err(std::io::Error::other)?;
        let (sender, receiver) = mpsc::channel(INBOX_CAPACITY);
        self.lock().insert(id, Inbox { token, sender });
        let registration = Registration {
            inboxes: self.clone(),
            id,
        };
        Ok((registration, receiver, token))
    }

    /// Hands `step`, sent by `sender`, to session `id` if `proof` is the client's
    /// proof that `sender` may forward it there.
    pub fn deliver(
        &self,
        id: u64,
        sender: &PeerId,
        proof: &ForwardProof,
        step: ForwardedStep,
    ) -> Result<(), Undelivered> {
        let inboxes = self.lock();
        let inbox = inboxes.get(&id).ok_or(Undelivered::UnknownSession)?;
        let expected = forward_proof(
            &inbox.token,
            &sender.to_bytes(),
            id,
            step.step,
            step.position,
        );
        if !same_token(&expected, proof) {
            return Err(Undelivered::BadProof);
        }
        inbox.sender.try_send(step).map_err(|_| Undelivered::Full)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Inbox>> {
        // The map stays consistent even if a holder panicked.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Compares proofs in time independent of where they differ.
fn same_token(a: &ForwardProof, b: &ForwardProof) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A session's place in [`Inboxes`], removed on drop.
pub struct Registration {
    inboxes: Inboxes,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inboxes.lock().remove(&self.id);
    }
}

/// Sends a session's outputs on to the next server, over one stream kept open to it.
#[derive(Default)]
pub struct Forwarder {
    stream: Option<(PeerId, Stream, ForwardLink)>,
}

impl Forwarder {
    /// Sends `output` (step `step`, at `position`) to `next`, naming `rest` as the
    /// servers after it. Returns the link it was handed over on, if it was; a failure
    /// is logged, not returned, since the client then sends the step itself.
    pub async fn forward(
        &mut self,
        network: &Network,
        (next, rest): (&NextHop, &[NextHop]),
        step: u64,
        position: u32,
        output: &Tensor,
        dtype: WireDType,
    ) -> Option<ForwardLink> {
        let Ok(peer) = PeerId::from_bytes(&next.peer) else {
            tracing::debug!("a step named an invalid peer id to forward to");
            return None;
        };
        let frame = match forwarded_frame((next, rest), step, position, output, dtype) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!("cannot encode a forwarded step: {e}");
                return None;
            }
        };
        let sent = tokio::time::timeout(
            FORWARD_TIMEOUT,
            self.send(network, (peer, &next.addrs), &frame),
        )
        .await;
        match sent {
            Ok(Ok(link)) => Some(link),
            Ok(Err(e)) => {
                tracing::debug!(%peer, "cannot forward a step: {e}");
                self.stream = None;
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "cannot forward a step within {FORWARD_TIMEOUT:?}");
                self.stream = None;
                None
            }
        }
    }

    /// Writes `frame` on the stream kept to `peer`; if that stream is gone (the next
    /// server closed it when it idled, say), once more on a new one, dialling `peer`
    /// at `addrs` (where the client reached it) if not connected. Returns the link
    /// the stream runs on, as it was when the stream opened.
    async fn send(
        &mut self,
        network: &Network,
        (peer, addrs): (PeerId, &[String]),
        frame: &[u8],
    ) -> Result<ForwardLink, String> {
        if let Some((to, stream, link)) = &mut self.stream {
            if *to == peer && write_frame(stream, frame).await.is_ok() {
                return Ok(*link);
            }
        }
        self.stream = None;
        if !addrs.is_empty() && matches!(network.path(peer).await, Ok(None)) {
            // Checked as announced addresses are: where they lead decides if dialled.
            let addrs = addrs.iter().filter_map(|a| a.parse().ok()).collect();
            let _ = network.add_addresses(peer, addrs).await;
        }
        let stream = network.open_stream(peer).await.map_err(|e| e.to_string())?;
        let link = match network.path(peer).await {
            Ok(Some(path)) => path.into(),
            _ => ForwardLink {
                kind: LinkKind::Unknown,
                rtt_us: None,
            },
        };
        let (_, stream, link) = self.stream.insert((peer, stream, link));
        write_frame(stream, frame)
            .await
            .map_err(|e| e.to_string())?;
        Ok(*link)
    }
}

/// The `Forwarded` message carrying `output`, encoded straight from the tensor's
/// memory (the one copy of its values on this way out).
fn forwarded_frame(
    (next, rest): (&NextHop, &[NextHop]),
    step: u64,
    position: u32,
    output: &Tensor,
    dtype: WireDType,
) -> Result<Vec<u8>, String> {
    let dims: Vec<u32> = output.dims().iter().map(|&d| d as u32).collect();
    let frame = with_values(output, |values| {
        let hidden = WireTensor::new(&dims, values, dtype).map_err(|e| e.to_string())?;
        let message = ClientMessage::Forwarded {
            session: next.session,
            step,
            proof: next.proof,
            position,
            hidden,
            forward: rest.to_vec(),
        };
        encode_frame(&message).map_err(|e| e.to_string())
    });
    frame.map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, position: u32) -> ForwardedStep {
        let hidden = WireTensor::from_f32(&[1, 1, 2], &[1.0, 2.0], WireDType::F32).unwrap();
        ForwardedStep {
            step,
            position,
            hidden,
            forward: Vec::new(),
        }
    }

    #[test]
    fn delivers_only_what_the_client_let_the_sender_forward() {
        let inboxes = Inboxes::default();
        let (registration, mut receiver, token) = inboxes.register(7).unwrap();
        let (_other, _, other_token) = inboxes.register(8).unwrap();
        assert_ne!(token, other_token, "tokens are random");
        let (sender, stranger) = (PeerId::random(), PeerId::random());
        let proof =
            |token, peer: &PeerId, id, s, p| forward_proof(token, &peer.to_bytes(), id, s, p);

        let good = proof(&token, &sender, 7, 1, 0);
        assert_eq!(inboxes.deliver(7, &sender, &good, step(1, 0)), Ok(()));
        assert_eq!(receiver.try_recv().unwrap().position, 0);
        // Another peer holding the proof, another session's token, or a proof for
        // another step or position: all refused.
        for (peer, proof, s, p) in [
            (&stranger, good, 1, 0),
            (&sender, proof(&other_token, &sender, 7, 1, 0), 1, 0),
            (&sender, good, 2, 0),
            (&sender, good, 1, 1),
        ] {
            assert_eq!(
                inboxes.deliver(7, peer, &proof, step(s, p)),
                Err(Undelivered::BadProof)
            );
        }
        assert_eq!(
            inboxes.deliver(9, &sender, &good, step(1, 0)),
            Err(Undelivered::UnknownSession)
        );
        for s in 2..2 + INBOX_CAPACITY as u64 {
            let good = proof(&token, &sender, 7, s, 0);
            assert_eq!(inboxes.deliver(7, &sender, &good, step(s, 0)), Ok(()));
        }
        let good = proof(&token, &sender, 7, 9, 0);
        assert_eq!(
            inboxes.deliver(7, &sender, &good, step(9, 0)),
            Err(Undelivered::Full)
        );

        drop(registration);
        assert_eq!(
            inboxes.deliver(7, &sender, &good, step(9, 0)),
            Err(Undelivered::UnknownSession)
        );
    }

    #[test]
    fn proofs_compare_whole() {
        let a = [3u8; TOKEN_BYTES];
        let mut b = a;
        assert!(same_token(&a, &b));
        b[TOKEN_BYTES - 1] ^= 1;
        assert!(!same_token(&a, &b));
    }
}
