//! Fair shares of a node's slots (open streams, sessions) among the peers that want
//! them, and of its compute among the sessions' steps.
//!
//! Peer ids cost nothing to make, so shares go to groups of peers by address: one
//! IPv4 address or IPv6 /64 is one group, however many peer ids use it, while many
//! honest users behind one carrier-grade NAT or relay still get a whole group's share
//! rather than a hard per-peer cap. Loopback peers are grouped by peer id: processes
//! on the node's own machine are its operator's.
//!
//! A group alone may use most of the node; a quarter of every kind of slot stays for
//! newcomers, and under contention the rest is split equally. Slots a group already
//! holds above its share are not taken back: they are released as their sessions end
//! or fall idle, and meanwhile that group gets no more.

use std::collections::HashMap;
use std::hash::Hash;

pub use crate::network::addresses::PeerGroup;

/// Fewest slots a group may always hold, however many groups there are.
pub const MIN_SHARE: usize = 2;

/// Most of `capacity` slots one group may hold while `others` other groups hold some.
pub fn share_limit(capacity: usize, others: usize) -> usize {
    let open = capacity - capacity / 4;
    (open / (others + 1)).max(MIN_SHARE).min(capacity)
}

/// Slots of one kind, counted per group.
#[derive(Debug)]
pub struct FairShare<G> {
    capacity: usize,
    used: usize,
    held: HashMap<G, usize>,
}

impl<G: Eq + Hash + Clone> FairShare<G> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: 0,
            held: HashMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn available(&self) -> usize {
        self.capacity - self.used
    }

    /// Takes a slot for `group` if the node has one and the group is within its share.
    pub fn try_take(&mut self, group: &G) -> bool {
        let held = self.held.get(group).copied().unwrap_or(0);
        let others = self.held.len() - usize::from(held > 0);
        if self.used >= self.capacity || held >= share_limit(self.capacity, others) {
            return false;
        }
        *self.held.entry(group.clone()).or_default() += 1;
        self.used += 1;
        true
    }

    /// Gives back one of `group`'s slots.
    pub fn release(&mut self, group: &G) {
        if let Some(held) = self.held.get_mut(group) {
            *held -= 1;
            self.used -= 1;
            if *held == 0 {
                self.held.remove(group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_alone_leaves_a_quarter_for_newcomers() {
        let mut slots = FairShare::new(16);
        let taken = (0..20).filter(|_| slots.try_take(&1)).count();
        assert_eq!(taken, 12);
        assert!(slots.try_take(&2), "a newcomer finds room");
        assert_eq!(slots.available(), 3);
    }

    #[test]
    fn under_contention_groups_converge_to_equal_shares() {
        let mut slots = FairShare::new(16);
        for _ in 0..12 {
            assert!(slots.try_take(&1));
        }
        // Group 2 may take up to its share of 6; group 1 gets nothing more until it
        // is back under its own.
        let taken = (0..10).filter(|_| slots.try_take(&2)).count();
        assert_eq!(taken, 4, "limited by what is free");
        assert!(!slots.try_take(&1));
        for _ in 0..7 {
            slots.release(&1);
        }
        assert!(slots.try_take(&1), "back under its share of 6");
        assert!(!slots.try_take(&1));
    }

    #[test]
    fn many_groups_still_get_the_minimum() {
        let mut slots = FairShare::new(64);
        for group in 0..20 {
            assert!(slots.try_take(&group) && slots.try_take(&group));
        }
        assert_eq!(share_limit(64, 19), MIN_SHARE);
        assert!(!slots.try_take(&3));
        slots.release(&3);
        assert!(slots.try_take(&3), "a released slot is the group's again");
    }
}
