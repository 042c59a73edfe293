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
}
