//! Routes over servers of the client's numerics version.
//!
//! Servers of one numerics version compute bit-identical outputs, so a route of them
//! gives the same tokens as any other route of them, and their outputs can be checked
//! against each other exactly. A route therefore takes only servers of the client's
//! version while they cover the layers, at any speed; only when they do not, it also
//! takes others, as few hops of them as it can.

use allmende_protocol::LayerRange;

use super::route::{plan_among, Candidate, Hop, RouteError};

/// Extra cost of each layer run by a server of another numerics version once the
/// client's own cannot cover the layers: above any honest cost, including a full
/// server's, so that a route gives them as few layers as coverage allows.
pub const OTHER_NUMERICS_PENALTY_MS: f64 = 1e9;

/// A route, and how many of its hops run another numerics version than the client's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferredRoute {
    pub hops: Vec<Hop>,
    pub other_numerics: usize,
}

/// The cheapest route over `target` among servers of numerics version `numerics`;
/// if they leave layers uncovered, the cheapest over all servers with as few layers
/// run by other versions as possible. The error names what no server covers at all.
pub fn plan_route_preferring<P>(
    candidates: &[Candidate<P>],
    target: LayerRange,
    numerics: u32,
) -> Result<PreferredRoute, RouteError> {
    // One pass: the penalty puts every route of the client's version alone below
    // every route with another version in it, and among those, fewer such layers first.
    let penalty = |c: &Candidate<P>| match c.numerics == numerics {
        true => 0.0,
        false => OTHER_NUMERICS_PENALTY_MS,
    };
    let hops = plan_among(candidates, target, penalty)?;
    let other_numerics = hops
        .iter()
        .filter(|h| candidates[h.server].numerics != numerics)
        .count();
    Ok(PreferredRoute {
        hops,
        other_numerics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::missing_ranges;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    const OURS: u32 = 7;
    const THEIRS: u32 = 8;

    fn server(peer: u32, start: u32, end: u32, numerics: u32) -> Candidate<u32> {
        Candidate {
            peer,
            range: LayerRange::new(start, end),
            throughput: 50.0,
            rtt_ms: Some(1.0),
            free_sessions: 4,
            numerics,
        }
    }

    fn route(c: &[Candidate<u32>], start: u32, end: u32) -> (Vec<(u32, u32, u32)>, usize) {
        let r = plan_route_preferring(c, LayerRange::new(start, end), OURS).unwrap();
        let hops = r
            .hops
            .iter()
            .map(|h| (c[h.server].peer, h.range.start, h.range.end))
            .collect();
        (hops, r.other_numerics)
    }

    #[test]
    fn mixed_versions_route_over_the_clients_own_even_when_slower() {
        // Peer 3 alone would be one fast hop; the client's version needs two slow ones.
        let mut fast = server(3, 0, 30, THEIRS);
        fast.throughput = 1000.0;
        let mut slow = server(2, 15, 30, OURS);
        slow.rtt_ms = Some(300.0);
        let c = [server(1, 0, 15, OURS), slow, fast];
        assert_eq!(route(&c, 0, 30), (vec![(1, 0, 15), (2, 15, 30)], 0));
    }

    #[test]
    fn only_other_versions_cover_so_the_route_falls_back_to_them() {
        let c = [server(1, 0, 30, THEIRS), server(2, 0, 30, THEIRS + 1)];
        let (hops, other) = route(&c, 0, 30);
        assert_eq!((hops.len(), other), (1, 1));
    }

    #[test]
    fn a_fallback_takes_other_versions_only_where_the_clients_leave_a_gap() {
        // The client's version covers all but 10..20; a server of another version
        // covers everything, and is cheaper as one hop, but takes only the gap.
        let mut fast = server(3, 0, 30, THEIRS);
        fast.throughput = 1000.0;
        let c = [server(1, 0, 10, OURS), server(2, 20, 30, OURS), fast];
        let (hops, other) = route(&c, 0, 30);
        assert_eq!(other, 1);
        assert_eq!(hops.first(), Some(&(1, 0, 10)));
        assert_eq!(hops.last(), Some(&(2, 20, 30)));
        assert_eq!(hops.len(), 3);
    }

    #[test]
    fn failover_after_a_kill_takes_the_same_version_replica() {
        // Route 1 + 2; 2 is killed and left out: the segment 15..30 goes to the
        // client's version's replica 4, not to 3, which is faster.
        let mut fast = server(3, 15, 30, THEIRS);
        fast.throughput = 1000.0;
        let mut far = server(4, 15, 30, OURS);
        far.rtt_ms = Some(50.0);
        let mut c = vec![server(1, 0, 15, OURS), server(2, 15, 30, OURS), fast, far];
        let (first, _) = route(&c, 0, 30);
        assert_eq!(first, vec![(1, 0, 15), (2, 15, 30)]);
        c.retain(|s| s.peer != 2);
        assert_eq!(route(&c, 15, 30), (vec![(4, 15, 30)], 0));
        // With the last replica of the client's version gone too, the other one serves.
        c.retain(|s| s.peer != 4);
        assert_eq!(route(&c, 15, 30), (vec![(3, 15, 30)], 1));
    }

    #[test]
    fn nothing_covering_names_the_missing_layers_of_all_versions() {
        let c = [server(1, 0, 10, OURS), server(2, 10, 20, THEIRS)];
        let err = plan_route_preferring(&c, LayerRange::new(0, 30), OURS).unwrap_err();
        assert_eq!(err, RouteError::Missing(vec![LayerRange::new(20, 30)]));
    }

    #[test]
    fn simulated_mixed_swarms_use_other_versions_only_when_needed() {
        let mut rng = SmallRng::seed_from_u64(5);
        for trial in 0..300 {
            let block_count: u32 = rng.random_range(1..=60);
            let c: Vec<Candidate<u32>> = (0..rng.random_range(1..=30))
                .map(|peer| {
                    let start = rng.random_range(0..block_count);
                    let end = rng.random_range(start + 1..=block_count);
                    let mut s = server(peer, start, end, rng.random_range(OURS..=THEIRS));
                    s.throughput = rng.random_range(0.0..200.0);
                    s.free_sessions = rng.random_range(0..3);
                    s
                })
                .collect();
            let ours = c.iter().filter(|s| s.numerics == OURS).map(|s| s.range);
            let ours_cover = missing_ranges(ours, block_count).is_empty();
            let all_cover = missing_ranges(c.iter().map(|s| s.range), block_count).is_empty();
            match plan_route_preferring(&c, LayerRange::new(0, block_count), OURS) {
                Ok(r) => {
                    assert!(all_cover, "trial {trial}");
                    assert_eq!(ours_cover, r.other_numerics == 0, "trial {trial}");
                    let mut layer = 0;
                    for hop in &r.hops {
                        assert_eq!(hop.range.start, layer, "trial {trial}: contiguous");
                        layer = hop.range.end;
                    }
                    assert_eq!(layer, block_count, "trial {trial}");
                }
                Err(_) => assert!(!all_cover, "trial {trial}"),
            }
        }
    }
}
