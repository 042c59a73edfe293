//! Which waiting steps the compute worker runs next: start-time fair queueing over
//! groups of peers (`share::PeerGroup`), with work measured in positions × layers.
//!
//! Each group has a finish tag, the virtual time at which the work it was given so far
//! ends; a waiting step starts at its group's tag, or now if the group was idle. The
//! steps with the earliest starts run first, so a group alone uses all the compute,
//! and under contention each gets an equal part of it whatever its number of
//! sessions or the size of its steps: a peer sending long prefills on many sessions
//! delays another's decode step by at most one batch.

use std::collections::HashMap;
use std::hash::Hash;

/// The finish tags of the groups that have had work recently.
#[derive(Debug)]
pub struct FairQueue<G> {
    now: u64,
    finish: HashMap<G, u64>,
}

impl<G> Default for FairQueue<G> {
    fn default() -> Self {
        Self {
            now: 0,
            finish: HashMap::new(),
        }
    }
}

impl<G: Eq + Hash + Copy> FairQueue<G> {
    /// Chooses a batch from `waiting` (each step's group, positions and work, in order
    /// of arrival): the earliest starts first, at most `max_jobs` steps and
    /// `max_positions` positions (a step that does not fit waits for the next batch;
    /// the first step chosen always runs). Returns indices into `waiting`, in the
    /// order chosen, and charges their groups.
    pub fn choose(
        &mut self,
        waiting: &[(G, usize, u64)],
        max_jobs: usize,
        max_positions: usize,
    ) -> Vec<usize> {
        let mut chosen: Vec<usize> = Vec::new();
        // Chosen, or passed over for this batch.
        let mut seen = vec![false; waiting.len()];
        let mut positions = 0;
        let mut first_start = None;
        while chosen.len() < max_jobs {
            let next = (0..waiting.len())
                .filter(|&i| !seen[i])
                .min_by_key(|&i| (self.start(&waiting[i].0), i));
            let Some(i) = next else { break };
            seen[i] = true;
            let (group, n, work) = waiting[i];
            if !chosen.is_empty() && positions + n > max_positions {
                continue;
            }
            let start = self.start(&group);
            first_start.get_or_insert(start);
            self.finish.insert(group, start + work.max(1));
            positions += n;
            chosen.push(i);
        }
        if let Some(start) = first_start {
            self.now = self.now.max(start);
            let now = self.now;
            // Groups whose work has all been served are idle: forgetting them changes
            // nothing (they would start at `now`) and keeps the table small.
            self.finish.retain(|_, finish| *finish > now);
        }
        chosen
    }

    fn start(&self, group: &G) -> u64 {
        self.finish
            .get(group)
            .map_or(self.now, |&f| f.max(self.now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_alone_gets_everything() {
        let mut q = FairQueue::default();
        let waiting = [(1, 1, 30), (1, 1, 30), (1, 1, 30)];
        assert_eq!(q.choose(&waiting, 32, 512), [0, 1, 2]);
    }

    #[test]
    fn a_decode_step_waits_at_most_one_batch_behind_many_prefills() {
        let mut q = FairQueue::default();
        // Group 1: eight 512-position prefills on eight sessions, then group 2's
        // decode step.
        let mut waiting: Vec<(u32, usize, u64)> = vec![(1, 512, 512 * 30); 8];
        waiting.push((2, 1, 30));
        let first = q.choose(&waiting, 32, 512);
        assert_eq!(
            first,
            [0],
            "a prefill fills the batch; the decode step does not fit"
        );
        waiting.remove(0);
        let second = q.choose(&waiting, 32, 512);
        assert_eq!(
            second,
            [7],
            "then the decode step, before the other prefills"
        );
    }

    #[test]
    fn contending_groups_share_work_equally() {
        let mut q = FairQueue::default();
        // Group 1 has four sessions decoding, group 2 one; one step per batch.
        let mut served = HashMap::new();
        for _ in 0..100 {
            let waiting = [(1, 1, 10), (1, 1, 10), (1, 1, 10), (1, 1, 10), (2, 1, 10)];
            for i in q.choose(&waiting, 1, 512) {
                *served.entry(waiting[i].0).or_insert(0) += 1;
            }
        }
        assert_eq!(served[&1], 50);
        assert_eq!(served[&2], 50);
    }

    #[test]
    fn an_idle_group_gets_no_credit_for_its_idleness() {
        let mut q = FairQueue::default();
        for _ in 0..50 {
            q.choose(&[(1, 1, 10)], 1, 512);
        }
        // Group 2 arrives: it starts now, not at zero, so it does not take the next
        // fifty batches for itself.
        let mut order = Vec::new();
        for _ in 0..4 {
            let waiting = [(1, 1, 10), (2, 1, 10)];
            order.extend(q.choose(&waiting, 1, 512).iter().map(|&i| waiting[i].0));
        }
        assert_eq!(order.iter().filter(|&&g| g == 2).count(), 2, "{order:?}");
    }
}
