//! Peers that failed a client recently, kept out of routes for a while. Each further
//! failure doubles the ban, so a flapping server is tried less and less often.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// First ban after a failure.
pub const BASE_BAN: Duration = Duration::from_secs(15);
/// Longest ban.
pub const MAX_BAN: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct BanList<P> {
    bans: HashMap<P, (Instant, u32)>,
}

impl<P> Default for BanList<P> {
    fn default() -> Self {
        Self {
            bans: HashMap::new(),
        }
    }
}

impl<P: Eq + Hash + Clone> BanList<P> {
    /// Records a failure of `peer` at `now`; returns how long it is banned.
    pub fn ban(&mut self, peer: &P, now: Instant) -> Duration {
        let strikes = self.bans.get(peer).map_or(0, |b| b.1) + 1;
        let factor = 1u32 << (strikes - 1).min(16);
        let duration = BASE_BAN.saturating_mul(factor).min(MAX_BAN);
        self.bans.insert(peer.clone(), (now + duration, strikes));
        duration
    }

    pub fn is_banned(&self, peer: &P, now: Instant) -> bool {
        self.bans.get(peer).is_some_and(|(until, _)| now < *until)
    }

    /// Forgets bans that ended more than [`MAX_BAN`] ago, and with them the peer's
    /// strikes: the list holds only peers that failed recently, however many failed.
    pub fn prune(&mut self, now: Instant) {
        self.bans.retain(|_, (until, _)| now < *until + MAX_BAN);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.bans.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.bans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_expire_and_grow_with_each_failure() {
        let mut bans = BanList::default();
        let t0 = Instant::now();
        assert!(!bans.is_banned(&1, t0));
        assert_eq!(bans.ban(&1, t0), BASE_BAN);
        assert!(bans.is_banned(&1, t0 + BASE_BAN / 2));
        assert!(!bans.is_banned(&1, t0 + BASE_BAN));
        assert!(!bans.is_banned(&2, t0));
        assert_eq!(bans.ban(&1, t0), BASE_BAN * 2);
        assert_eq!(bans.ban(&1, t0), BASE_BAN * 4);
        for _ in 0..40 {
            bans.ban(&1, t0);
        }
        assert_eq!(bans.ban(&1, t0), MAX_BAN);
    }

    #[test]
    fn pruning_forgets_long_expired_bans_and_their_strikes() {
        let mut bans = BanList::default();
        let t0 = Instant::now();
        bans.ban(&1, t0);
        bans.ban(&1, t0);
        bans.ban(&2, t0 + MAX_BAN * 2);
        bans.prune(t0 + BASE_BAN * 2 + MAX_BAN / 2);
        assert_eq!(bans.len(), 2, "a recent failure is remembered");
        bans.prune(t0 + BASE_BAN * 2 + MAX_BAN);
        assert_eq!(bans.len(), 1);
        assert!(bans.is_banned(&2, t0 + MAX_BAN * 2));
        assert_eq!(
            bans.ban(&1, t0 + MAX_BAN * 3),
            BASE_BAN,
            "strikes start over"
        );
    }
}
