//! Admission: every decision on whether this node takes on a stream or a session, in
//! one place, and what each admitted one holds until it is dropped.
//!
//! A stream needs a peer that is not banned and a slot in its group's fair share of
//! streams. A session needs a place among its peer's own sessions (the guard's
//! per-peer limit), a server that is not draining and serves the layers asked for, a
//! slot in its group's share of sessions, room in the KV-cache budget for its whole
//! length (so the node never over-commits), and a token for the steps other servers
//! forward into it. Whatever is taken is given back when its holder drops it.

use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allmende_protocol::inference::SessionToken;
use allmende_protocol::{ErrorKind, LayerRange, ModelId};
use libp2p::PeerId;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::forwarding::{ForwardedStep, Registration};
use super::guard::Verdict;
use super::reply::Refusal;
use super::share::{FairShare, PeerGroup};
use super::ShardServer;
use crate::model::ShardCache;
use crate::network::Network;

/// The kinds of slot a server shares among groups of peers.
#[derive(Clone, Copy, Debug)]
pub enum SlotKind {
    Stream,
    Session,
}

/// How a server's slots are shared among groups of peers.
pub(super) struct Shares {
    streams: FairShare<PeerGroup>,
    sessions: FairShare<PeerGroup>,
}

impl Shares {
    /// Room for `max_sessions` sessions, and for streams beyond them: probes, and
    /// streams that carry forwarded steps.
    pub(super) fn new(max_sessions: usize) -> Self {
        Self {
            streams: FairShare::new(max_sessions * 2 + 16),
            sessions: FairShare::new(max_sessions),
        }
    }

    fn of(&mut self, kind: SlotKind) -> &mut FairShare<PeerGroup> {
        match kind {
            SlotKind::Stream => &mut self.streams,
            SlotKind::Session => &mut self.sessions,
        }
    }
}

/// Why no slot was given.
#[derive(Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// The node has none left.
    Full,
    /// The group holds its fair share.
    OverShare,
}

impl NoSlot {
    /// What a peer refused a slot of `kind` is told, on a node of `max_sessions`.
    pub fn reason(&self, kind: SlotKind, max_sessions: usize) -> String {
        match (kind, self) {
            (SlotKind::Stream, NoSlot::Full) => "every stream is in use".into(),
            (SlotKind::Stream, NoSlot::OverShare) => {
                "this address holds its fair share of streams here".into()
            }
            (SlotKind::Session, NoSlot::Full) => format!("all {max_sessions} sessions are in use"),
            (SlotKind::Session, NoSlot::OverShare) => {
                "this address holds its fair share of sessions here".into()
            }
        }
    }
}

/// Takes one of `slots` for `group` if the node has one left and the group is within
/// its share.
fn take<G: Eq + Hash + Clone>(slots: &mut FairShare<G>, group: &G) -> Result<(), NoSlot> {
    if slots.available() == 0 {
        Err(NoSlot::Full)
    } else if slots.try_take(group) {
        Ok(())
    } else {
        Err(NoSlot::OverShare)
    }
}

/// A slot in a group's share, given back when dropped.
pub struct ShareSlot {
    server: Arc<ShardServer>,
    group: PeerGroup,
    kind: SlotKind,
}

impl Drop for ShareSlot {
    fn drop(&mut self) {
        let (group, kind) = (self.group, self.kind);
        self.server.shares(|s| s.of(kind).release(&group));
    }
}

/// One of a peer's sessions, counted in the per-peer limit until dropped.
pub struct PeerSlot {
    server: Arc<ShardServer>,
    peer: PeerId,
    group: PeerGroup,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.server.guard(|g| g.on_close(&self.peer));
    }
}

/// Why a stream was not admitted.
pub(super) enum StreamRefused {
    /// The peer is banned: its streams are dropped unanswered.
    Banned,
    /// No slot: the stream is answered `Busy`.
    Busy(NoSlot),
}

/// Why a session was not admitted.
pub(super) enum NotAdmitted {
    /// Answered `Busy`: the node, or the share of the peer or its group, is full for now.
    Busy(String),
    /// Answered `Error`.
    Refused(Refusal),
    /// The peer asked past its limit once too often: banned this long, its stream closed.
    Banned(Duration),
}

/// A session admitted: its id, its cache, its token, and what it holds while open.
pub(super) struct Admitted {
    pub id: u64,
    pub cache: ShardCache,
    pub token: SessionToken,
    /// Where steps forwarded into the session by the previous server of its route arrive.
    pub inbox: mpsc::Receiver<ForwardedStep>,
    pub tickets: Tickets,
}

/// What an open session holds from admission; dropping it gives each back.
pub(super) struct Tickets {
    _registration: Registration,
    _slot: ShareSlot,
    _kv_reservation: OwnedSemaphorePermit,
    _peer_slot: PeerSlot,
}

/// The positions a session may hold: what its client asked for, within the server's
/// limit; none is refused.
fn session_len(requested: u32, limit: usize) -> Option<usize> {
    let len = (requested as usize).min(limit);
    (len > 0).then_some(len)
}

/// `bytes` of the KV-cache budget in its unit, KiB, rounded up.
fn kv_kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as u64) as u32
}

impl ShardServer {
    /// A stream slot for `peer`, taken before its stream is served.
    pub(super) fn admit_stream(
        self: &Arc<Self>,
        peer: PeerId,
        network: &Network,
    ) -> Result<(PeerGroup, ShareSlot), StreamRefused> {
        if self.guard(|g| g.is_banned(&peer, Instant::now())) {
            return Err(StreamRefused::Banned);
        }
        let group = PeerGroup::of(peer, network.address_of(&peer));
        match self.take_slot(SlotKind::Stream, group) {
            Ok(slot) => Ok((group, slot)),
            Err(why) => {
                self.metrics.busy_refusals.inc();
                Err(StreamRefused::Busy(why))
            }
        }
    }

    /// A place among `peer`'s sessions here, if it is under its limit.
    pub(super) fn admit_peer_session(
        self: &Arc<Self>,
        peer: PeerId,
        group: PeerGroup,
    ) -> Result<PeerSlot, NotAdmitted> {
        match self.guard(|g| g.on_open(&peer, Instant::now())) {
            Verdict::Allow => Ok(PeerSlot {
                server: self.clone(),
                peer,
                group,
            }),
            Verdict::Ban(duration) => Err(NotAdmitted::Banned(duration)),
            Verdict::Refuse => Err(NotAdmitted::Busy(format!(
                "this peer already holds {} sessions here",
                self.limits.peers.sessions_per_peer
            ))),
        }
    }

    /// A session of layers `range` of `model`, of up to `max_len` positions, for the
    /// peer holding `peer_slot`: its cache, a slot in its group's share, its room in
    /// the KV-cache budget, an id and a token.
    pub(super) fn admit_session(
        self: &Arc<Self>,
        peer_slot: PeerSlot,
        model: ModelId,
        range: LayerRange,
        max_len: u32,
    ) -> Result<Admitted, NotAdmitted> {
        let refused = |kind, message: String| NotAdmitted::Refused((kind, message));
        if self.is_draining() {
            let msg = "this server is shutting down".into();
            return Err(refused(ErrorKind::ShuttingDown, msg));
        }
        if model != self.model {
            let msg = format!("this server serves model {}", self.model.short());
            return Err(refused(ErrorKind::WrongModel, msg));
        }
        let Some(max_len) = session_len(max_len, self.limits.max_session_len) else {
            let msg = "max_len must be positive".into();
            return Err(refused(ErrorKind::BadRequest, msg));
        };
        let Some(cache) = self.shard.new_cache_for(range, max_len) else {
            let msg = format!(
                "layers {range} are not within this server's {}",
                self.shard.range()
            );
            return Err(refused(ErrorKind::WrongModel, msg));
        };
        let slot = self
            .take_slot(SlotKind::Session, peer_slot.group)
            .map_err(|why| {
                self.metrics.busy_refusals.inc();
                NotAdmitted::Busy(why.reason(SlotKind::Session, self.limits.max_sessions))
            })?;
        let bytes = self.kv_bytes_per_position(range.len()) * cache.max_len() as u64;
        let Ok(kv_reservation) = self.kv_budget.clone().try_acquire_many_owned(kv_kib(bytes))
        else {
            self.metrics.busy_refusals.inc();
            return Err(NotAdmitted::Busy(format!(
                "the KV-cache budget of {} MiB cannot hold {} more positions",
                self.limits.kv_cache_bytes >> 20,
                cache.max_len()
            )));
        };
        self.metrics.sessions_opened.inc();
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (registration, inbox, token) = self.inboxes.register(id).map_err(|e| {
            let msg = format!("cannot make a session token: {e}");
            refused(ErrorKind::Internal, msg)
        })?;
        Ok(Admitted {
            id,
            cache,
            token,
            inbox,
            tickets: Tickets {
                _registration: registration,
                _slot: slot,
                _kv_reservation: kv_reservation,
                _peer_slot: peer_slot,
            },
        })
    }

    /// Sessions that may still open.
    pub(super) fn free_sessions(&self) -> usize {
        self.shares(|s| s.sessions.available())
    }

    /// Runs `f` on the fair shares (never held across an await).
    fn shares<T>(&self, f: impl FnOnce(&mut Shares) -> T) -> T {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut shares)
    }

    /// A slot of `kind` for `group`, if the node has one and the group is within its
    /// share.
    fn take_slot(self: &Arc<Self>, kind: SlotKind, group: PeerGroup) -> Result<ShareSlot, NoSlot> {
        self.shares(|s| take(s.of(kind), &group))?;
        Ok(ShareSlot {
            server: self.clone(),
            group,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_refused_when_the_node_is_full_or_the_group_over_its_share() {
        // Four slots: one group alone may hold three, leaving one for newcomers.
        let mut slots = FairShare::new(4);
        for _ in 0..3 {
            assert_eq!(take(&mut slots, &'a'), Ok(()));
        }
        assert_eq!(take(&mut slots, &'a'), Err(NoSlot::OverShare));
        assert_eq!(take(&mut slots, &'b'), Ok(()));
        assert_eq!(take(&mut slots, &'b'), Err(NoSlot::Full));
        slots.release(&'a');
        assert_eq!(take(&mut slots, &'c'), Ok(()));
    }

    #[test]
    fn a_session_holds_what_it_asked_for_within_the_limit() {
        assert_eq!(session_len(100, 4096), Some(100));
        assert_eq!(session_len(u32::MAX, 4096), Some(4096));
        assert_eq!(session_len(0, 4096), None);
        assert_eq!(session_len(5, 0), None);
    }

    #[test]
    fn kv_reservations_round_up_to_whole_kib() {
        assert_eq!(kv_kib(0), 0);
        assert_eq!(kv_kib(1), 1);
        assert_eq!(kv_kib(1024), 1);
        assert_eq!(kv_kib(1025), 2);
        assert_eq!(kv_kib(u64::MAX), u32::MAX);
    }

    #[test]
    fn refusals_say_which_slot_is_missing() {
        let stream = NoSlot::Full.reason(SlotKind::Stream, 8);
        assert_eq!(stream, "every stream is in use");
        let session = NoSlot::Full.reason(SlotKind::Session, 8);
        assert_eq!(session, "all 8 sessions are in use");
        assert!(NoSlot::OverShare
            .reason(SlotKind::Session, 8)
            .contains("fair share of sessions"));
    }
}
