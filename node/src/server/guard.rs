//! Per-peer limits of a server: request rate, concurrent sessions, and bans for peers
//! that misbehave. Pure bookkeeping over explicit times, so it is unit-tested without a
//! network; the session handlers report to it and obey its verdicts.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::routing::BanList;

#[derive(Clone, Debug)]
pub struct PeerLimits {
    /// Sessions one peer may hold at once, beyond its address's fair share (see
    /// `share`); exceeding it is an offence. Unlimited by default.
    pub sessions_per_peer: usize,
    /// Sustained messages per second from one peer, and the burst allowed above it:
    /// messages that are not steps, and steps that are refused.
    pub requests_per_second: f64,
    pub burst: f64,
    /// Offences within [`OFFENCE_WINDOW`] that get a peer banned.
    pub offences_to_ban: u32,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            sessions_per_peer: usize::MAX,
            requests_per_second: 200.0,
            burst: 400.0,
            offences_to_ban: 3,
        }
    }
}

/// Offences are forgotten after this long.
pub const OFFENCE_WINDOW: Duration = Duration::from_secs(60);

/// Things a peer did that a well-behaved client never does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offence {
    /// A frame over the size limit, or bytes that are not a message.
    BadFrame,
    /// More requests than the rate limit allows.
    Flooding,
    /// Opening sessions beyond its per-peer limit.
    TooManySessions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse this request but keep the peer.
    Refuse,
    /// Cut the peer off for this long.
    Ban(Duration),
}

struct PeerState {
    tokens: f64,
    refilled: Instant,
    sessions: usize,
    offences: Vec<Instant>,
}

pub struct PeerGuard<P> {
    limits: PeerLimits,
    peers: HashMap<P, PeerState>,
    bans: BanList<P>,
}

impl<P: Eq + Hash + Clone> PeerGuard<P> {
    pub fn new(limits: PeerLimits) -> Self {
        Self {
            limits,
            peers: HashMap::new(),
            bans: BanList::default(),
        }
    }

    pub fn is_banned(&self, peer: &P, now: Instant) -> bool {
        self.bans.is_banned(peer, now)
    }

    fn state(&mut self, peer: &P, now: Instant) -> &mut PeerState {
        let burst = self.limits.burst;
        self.peers.entry(peer.clone()).or_insert_with(|| PeerState {
            tokens: burst,
            refilled: now,
            sessions: 0,
            offences: Vec::new(),
        })
    }

    /// A message arrived from `peer`: within its rate, or an offence.
    pub fn on_request(&mut self, peer: &P, now: Instant) -> Verdict {
        match self.within_rate(peer, now) {
            true => Verdict::Allow,
            false => self.offend(peer, Offence::Flooding, now),
        }
    }

    /// Takes one request from `peer`'s rate if it has one left; going past it is not
    /// held against the peer (for what an honest peer may relay from another).
    pub fn within_rate(&mut self, peer: &P, now: Instant) -> bool {
        let (rate, burst) = (self.limits.requests_per_second, self.limits.burst);
        let state = self.state(peer, now);
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + elapsed * rate).min(burst);
        state.refilled = now;
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            return true;
        }
        false
    }

    /// `peer` asks for a session: allowed while under its limit.
    pub fn on_open(&mut self, peer: &P, now: Instant) -> Verdict {
        let limit = self.limits.sessions_per_peer;
        let state = self.state(peer, now);
        if state.sessions < limit {
            state.sessions += 1;
            return Verdict::Allow;
        }
        self.offend(peer, Offence::TooManySessions, now)
    }

    /// One of `peer`'s sessions ended.
    pub fn on_close(&mut self, peer: &P) {
        if let Some(state) = self.peers.get_mut(peer) {
            state.sessions = state.sessions.saturating_sub(1);
        }
    }

    /// Records an offence; enough of them within the window get the peer banned.
    pub fn offend(&mut self, peer: &P, _offence: Offence, now: Instant) -> Verdict {
        let limit = self.limits.offences_to_ban as usize;
        let state = self.state(peer, now);
        state
            .offences
            .retain(|t| now.saturating_duration_since(*t) < OFFENCE_WINDOW);
        state.offences.push(now);
        if state.offences.len() >= limit {
            state.offences.clear();
            return Verdict::Ban(self.bans.ban(peer, now));
        }
        Verdict::Refuse
    }

    /// Forgets peers with nothing open and nothing held against them, so the table
    /// does not grow with every peer ever seen.
    pub fn prune(&mut self, now: Instant) {
        self.peers.retain(|_, s| {
            s.offences
                .retain(|t| now.saturating_duration_since(*t) < OFFENCE_WINDOW);
            s.sessions > 0 || !s.offences.is_empty()
        });
        self.bans.prune(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PeerLimits {
        PeerLimits {
            sessions_per_peer: 2,
            requests_per_second: 10.0,
            burst: 5.0,
            offences_to_ban: 3,
        }
    }

    #[test]
    fn rate_limits_with_a_burst_and_refills() {
        let mut g = PeerGuard::new(limits());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(g.on_request(&1, t0), Verdict::Allow);
        }
        assert_eq!(g.on_request(&1, t0), Verdict::Refuse);
        assert_eq!(
            g.on_request(&2, t0),
            Verdict::Allow,
            "peers are limited separately"
        );
        assert_eq!(
            g.on_request(&1, t0 + Duration::from_millis(150)),
            Verdict::Allow
        );
    }

    #[test]
    fn a_flooding_peer_is_banned_and_the_ban_expires() {
        let mut g = PeerGuard::new(limits());
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..8).map(|_| g.on_request(&1, t0)).collect();
        assert!(matches!(verdicts[7], Verdict::Ban(_)), "{verdicts:?}");
        assert!(g.is_banned(&1, t0));
        assert!(!g.is_banned(&2, t0));
        assert!(!g.is_banned(&1, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn limits_sessions_per_peer() {
        let mut g = PeerGuard::new(limits());
        let t0 = Instant::now();
        assert_eq!(g.on_open(&1, t0), Verdict::Allow);
        assert_eq!(g.on_open(&1, t0), Verdict::Allow);
        assert_eq!(g.on_open(&1, t0), Verdict::Refuse);
        g.on_close(&1);
        assert_eq!(g.on_open(&1, t0), Verdict::Allow);
        assert_eq!(g.on_open(&2, t0), Verdict::Allow);
    }

    #[test]
    fn old_offences_are_forgotten() {
        let mut g = PeerGuard::new(limits());
        let t0 = Instant::now();
        assert_eq!(g.offend(&1, Offence::BadFrame, t0), Verdict::Refuse);
        assert_eq!(g.offend(&1, Offence::BadFrame, t0), Verdict::Refuse);
        let later = t0 + OFFENCE_WINDOW + Duration::from_secs(1);
        assert_eq!(g.offend(&1, Offence::BadFrame, later), Verdict::Refuse);
        g.prune(later + OFFENCE_WINDOW * 2);
        assert!(g.peers.is_empty());
    }

    #[test]
    fn bans_are_pruned_with_the_peers() {
        let mut g = PeerGuard::new(limits());
        let t0 = Instant::now();
        for peer in 0..100 {
            for _ in 0..3 {
                g.offend(&peer, Offence::BadFrame, t0);
            }
        }
        assert!(g.is_banned(&7, t0));
        g.prune(t0 + Duration::from_secs(3600));
        assert_eq!(g.bans.len(), 0);
    }
}
