//! What peers can make a node hold by sending frames slowly: the bytes of frames
//! being received, shared by every stream that draws on it, with a share per group
//! of senders (an address) so that one address cannot hold all of it and leave every
//! other peer's large frames refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::addresses::PeerGroup;

/// Bytes of frames being received. A frame's buffer grows as its bytes arrive, each
/// growth charged here (to the group it came from, if the budget was handed out
/// with [`FrameBudget::for_group`]) and given back when the frame is read or
/// abandoned.
#[derive(Clone, Debug)]
pub struct FrameBudget {
    shared: Arc<Shared>,
    group: Option<PeerGroup>,
}

#[derive(Debug)]
struct Shared {
    per_group: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    left: usize,
    held: HashMap<PeerGroup, usize>,
}

impl FrameBudget {
    /// `total` bytes, of which one group of senders may hold at most `per_group`.
    pub fn new(total: usize, per_group: usize) -> Self {
        let state = State {
            left: total,
            held: HashMap::new(),
        };
        Self {
            shared: Arc::new(Shared {
                per_group,
                state: Mutex::new(state),
            }),
            group: None,
        }
    }

    /// The same budget, charging what it grants to `group`'s share.
    pub fn for_group(&self, group: PeerGroup) -> Self {
        Self {
            shared: self.shared.clone(),
            group: Some(group),
        }
    }

    /// Bytes not charged to any frame.
    pub fn left(&self) -> usize {
        self.lock().left
    }

    /// Charges `bytes` if both the budget and the group's share have room for them.
    pub(super) fn take(&self, bytes: usize) -> bool {
        let mut state = self.lock();
        if state.left < bytes {
            return false;
        }
        if let Some(group) = self.group {
            let held = state.held.entry(group).or_default();
            if *held + bytes > self.shared.per_group {
                return false;
            }
            *held += bytes;
        }
        state.left -= bytes;
        true
    }

    /// Gives back `bytes` that [`FrameBudget::take`] granted.
    pub(super) fn give_back(&self, bytes: usize) {
        let mut state = self.lock();
        state.left += bytes;
        if let Some(group) = self.group {
            if let Some(held) = state.held.get_mut(&group) {
                *held = held.saturating_sub(bytes);
                if *held == 0 {
                    state.held.remove(&group);
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Counters only: a panic elsewhere cannot leave them half-updated.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_group_holds_at_most_its_share() {
        let budget = FrameBudget::new(100, 40);
        let a = budget.for_group(PeerGroup::Net(1));
        let b = budget.for_group(PeerGroup::Net(2));
        assert!(a.take(30));
        assert!(!a.take(20), "past a's share");
        assert!(b.take(40));
        assert_eq!(budget.left(), 30);
        a.give_back(30);
        assert!(a.take(40), "a's share is free again");
        let c = budget.for_group(PeerGroup::Net(3));
        assert!(c.take(20));
        assert!(!c.take(1), "the whole budget is held");
        // Without a group only the total counts.
        b.give_back(40);
        assert!(budget.take(40));
        assert_eq!(budget.left(), 0);
    }
}
