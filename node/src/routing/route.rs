//! Choosing a chain of servers that covers every layer of a model.
//!
//! The layers' boundaries `0..=block_count` are the nodes of a graph; a server hosting
//! `[s, e)` gives an edge `a → b` for every `s ≤ a < b ≤ e`, since a route may switch
//! servers at any layer boundary. An edge costs the server's round-trip time plus the
//! compute time of its `b - a` layers, and the route is the cheapest path from 0 to
//! `block_count` (Dijkstra; all costs are positive).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fmt;

use allmende_protocol::LayerRange;

/// Round-trip time assumed for a server that has not been measured.
pub const UNKNOWN_RTT_MS: f64 = 20.0;
/// Throughput assumed for a server that announced none (tokens/s through its range).
pub const UNKNOWN_THROUGHPUT: f64 = 1.0;
/// Extra cost of a server that announced no free session: used only when nothing else
/// covers its layers.
pub const FULL_PENALTY_MS: f64 = 10_000.0;

/// One server as the router sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<P> {
    pub peer: P,
    pub range: LayerRange,
    /// Decode tokens/s through the whole hosted range.
    pub throughput: f64,
    pub rtt_ms: Option<f64>,
    pub free_sessions: u32,
    /// The numerics version the server announced.
    pub numerics: u32,
}

impl<P> Candidate<P> {
    /// Estimated milliseconds for one token through `layers` of this server's layers.
    fn cost_ms(&self, layers: u32) -> f64 {
        let throughput = if self.throughput > 0.0 {
            self.throughput
        } else {
            UNKNOWN_THROUGHPUT
        };
        let per_layer_ms = 1000.0 / (throughput * self.range.len().max(1) as f64);
        let full = if self.free_sessions == 0 {
            FULL_PENALTY_MS
        } else {
            0.0
        };
        self.rtt_ms.unwrap_or(UNKNOWN_RTT_MS) + per_layer_ms * layers as f64 + full
    }
}

/// One segment of a route: `range` served by `candidates[server]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub server: usize,
    pub range: LayerRange,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Layers no candidate serves.
    #[error("no server for layers {}", MissingList(.0))]
    Missing(Vec<LayerRange>),
}

struct MissingList<'a>(&'a [LayerRange]);

impl fmt::Display for MissingList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Maximal runs of layers in `0..block_count` that no range in `ranges` covers.
pub fn missing_ranges(
    ranges: impl IntoIterator<Item = LayerRange>,
    block_count: u32,
) -> Vec<LayerRange> {
    let mut covered = vec![false; block_count as usize];
    for r in ranges {
        for layer in r.start.min(block_count)..r.end.min(block_count) {
            covered[layer as usize] = true;
        }
    }
    let mut missing = Vec::new();
    let mut start = None;
    for (layer, &c) in covered.iter().enumerate() {
        match (c, start) {
            (false, None) => start = Some(layer as u32),
            (true, Some(s)) => {
                missing.push(LayerRange::new(s, layer as u32));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        missing.push(LayerRange::new(s, block_count));
    }
    missing
}

#[derive(PartialEq)]
struct State {
    cost: f64,
    hops: u32,
    layer: u32,
}

impl Eq for State {}

impl Ord for State {
    // Reversed: BinaryHeap is a max-heap and we want the cheapest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .cost
            .total_cmp(&self.cost)
            .then(other.hops.cmp(&self.hops))
            .then(other.layer.cmp(&self.layer))
    }
}

impl PartialOrd for State {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The cheapest chain of hops covering `0..block_count`. Ties go to fewer hops, then to
/// the earlier candidate, so the result is deterministic for a given snapshot.
pub fn plan_route<P>(
    candidates: &[Candidate<P>],
    block_count: u32,
) -> Result<Vec<Hop>, RouteError> {
    plan_route_over(candidates, LayerRange::new(0, block_count))
}

/// The cheapest chain of hops covering `target`: a whole model, or the segment of a
/// route that lost its server.
pub fn plan_route_over<P>(
    candidates: &[Candidate<P>],
    target: LayerRange,
) -> Result<Vec<Hop>, RouteError> {
    plan_among(candidates, target, |_| 0.0)
}

/// The cheapest chain of hops covering `target`, `extra(candidate)` ms added to the
/// cost of each layer a candidate runs.
pub(super) fn plan_among<P>(
    candidates: &[Candidate<P>],
    target: LayerRange,
    extra: impl Fn(&Candidate<P>) -> f64,
) -> Result<Vec<Hop>, RouteError> {
    let (first, last) = (target.start, target.end);
    let clipped = candidates.iter().filter_map(|c| {
        let start = c.range.start.max(first);
        let end = c.range.end.min(last);
        (start < end).then(|| LayerRange::new(start - first, end - first))
    });
    let missing: Vec<LayerRange> = missing_ranges(clipped, last.saturating_sub(first))
        .into_iter()
        .map(|r| LayerRange::new(r.start + first, r.end + first))
        .collect();
    if !missing.is_empty() {
        return Err(RouteError::Missing(missing));
    }
    let n = last as usize;
    let mut best: Vec<(f64, u32)> = vec![(f64::INFINITY, u32::MAX); n + 1];
    let mut came_from: Vec<Option<(u32, usize)>> = vec![None; n + 1];
    let mut heap = BinaryHeap::new();
    best[first as usize] = (0.0, 0);
    heap.push(State {
        cost: 0.0,
        hops: 0,
        layer: first,
    });
    while let Some(State { cost, hops, layer }) = heap.pop() {
        if (cost, hops) > best[layer as usize] || layer == last {
            continue;
        }
        for (i, c) in candidates.iter().enumerate() {
            if !c.range.contains(layer) {
                continue;
            }
            let extra = extra(c);
            for end in layer + 1..=c.range.end.min(last) {
                let layers = end - layer;
                let next = (cost + c.cost_ms(layers) + extra * layers as f64, hops + 1);
                if next < best[end as usize] {
                    best[end as usize] = next;
                    came_from[end as usize] = Some((layer, i));
                    heap.push(State {
                        cost: next.0,
                        hops: next.1,
                        layer: end,
                    });
                }
            }
        }
    }
    let mut hops = Vec::new();
    let mut layer = last;
    while layer > first {
        let Some((from, server)) = came_from[layer as usize] else {
            // Unreachable when nothing is missing, but never panic on a snapshot.
            return Err(RouteError::Missing(vec![LayerRange::new(first, layer)]));
        };
        hops.push(Hop {
            server,
            range: LayerRange::new(from, layer),
        });
        layer = from;
    }
    hops.reverse();
    Ok(hops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn server(peer: u32, start: u32, end: u32, throughput: f64, rtt: f64) -> Candidate<u32> {
        Candidate {
            peer,
            range: LayerRange::new(start, end),
            throughput,
            rtt_ms: Some(rtt),
            free_sessions: 4,
            numerics: 1,
        }
    }

    fn peers(route: &[Hop], c: &[Candidate<u32>]) -> Vec<(u32, u32, u32)> {
        route
            .iter()
            .map(|h| (c[h.server].peer, h.range.start, h.range.end))
            .collect()
    }

    #[test]
    fn chains_disjoint_shards() {
        let c = [
            server(1, 0, 10, 50.0, 1.0),
            server(2, 10, 20, 50.0, 1.0),
            server(3, 20, 30, 50.0, 1.0),
        ];
        let route = plan_route(&c, 30).unwrap();
        assert_eq!(
            peers(&route, &c),
            vec![(1, 0, 10), (2, 10, 20), (3, 20, 30)]
        );
    }

    #[test]
    fn prefers_one_hop_over_three_when_equally_fast() {
        let c = [
            server(1, 0, 20, 50.0, 1.0),
            server(2, 10, 30, 50.0, 1.0),
            server(3, 0, 30, 50.0, 1.0),
        ];
        let route = plan_route(&c, 30).unwrap();
        assert_eq!(peers(&route, &c), vec![(3, 0, 30)]);
    }

    #[test]
    fn switches_servers_inside_overlaps_to_avoid_a_slow_one() {
        // Peer 3 covers everything but is slow and far; 1 and 2 overlap on 10..20.
        let c = [
            server(1, 0, 20, 100.0, 1.0),
            server(2, 10, 30, 100.0, 1.0),
            server(3, 0, 30, 2.0, 200.0),
        ];
        let route = plan_route(&c, 30).unwrap();
        assert_eq!(route.len(), 2);
        assert_eq!(c[route[0].server].peer, 1);
        assert_eq!(c[route[1].server].peer, 2);
        assert_eq!(route[0].range.end, route[1].range.start);
    }

    #[test]
    fn lower_rtt_wins_between_replicas() {
        let c = [server(1, 0, 30, 50.0, 40.0), server(2, 0, 30, 50.0, 2.0)];
        assert_eq!(peers(&plan_route(&c, 30).unwrap(), &c), vec![(2, 0, 30)]);
    }

    #[test]
    fn full_servers_are_a_last_resort() {
        let mut full = server(1, 0, 30, 500.0, 0.5);
        full.free_sessions = 0;
        let c = [full.clone(), server(2, 0, 30, 20.0, 5.0)];
        assert_eq!(peers(&plan_route(&c, 30).unwrap(), &c), vec![(2, 0, 30)]);
        let only = [full];
        assert_eq!(plan_route(&only, 30).unwrap().len(), 1);
    }

    #[test]
    fn names_the_missing_layers() {
        let c = [server(1, 0, 10, 50.0, 1.0), server(2, 12, 20, 50.0, 1.0)];
        let err = plan_route(&c, 30).unwrap_err();
        assert_eq!(err.to_string(), "no server for layers 10..12, 20..30");
        assert_eq!(
            plan_route::<u32>(&[], 30).unwrap_err(),
            RouteError::Missing(vec![LayerRange::new(0, 30)])
        );
    }

    #[test]
    fn reroutes_one_segment() {
        let c = [server(1, 0, 15, 50.0, 1.0), server(3, 10, 30, 50.0, 1.0)];
        let route = plan_route_over(&c, LayerRange::new(15, 30)).unwrap();
        assert_eq!(peers(&route, &c), vec![(3, 15, 30)]);
        let err = plan_route_over(&c[..1], LayerRange::new(15, 30)).unwrap_err();
        assert_eq!(err.to_string(), "no server for layers 15..30");
        let err =
            plan_route_over(&[server(4, 20, 30, 50.0, 1.0)], LayerRange::new(15, 30)).unwrap_err();
        assert_eq!(err.to_string(), "no server for layers 15..20");
    }

    #[test]
    fn simulated_swarms_always_get_a_valid_route() {
        let mut rng = SmallRng::seed_from_u64(7);
        for trial in 0..300 {
            let block_count: u32 = rng.random_range(1..=80);
            let n = rng.random_range(1..=60);
            let c: Vec<Candidate<u32>> = (0..n)
                .map(|peer| {
                    let start = rng.random_range(0..block_count);
                    let end = rng.random_range(start + 1..=block_count);
                    let mut s = server(
                        peer,
                        start,
                        end,
                        rng.random_range(0.0..200.0),
                        rng.random_range(0.1..100.0),
                    );
                    s.free_sessions = rng.random_range(0..3);
                    s
                })
                .collect();
            let missing = missing_ranges(c.iter().map(|c| c.range), block_count);
            match plan_route(&c, block_count) {
                Ok(route) => {
                    assert!(missing.is_empty(), "trial {trial}");
                    let mut layer = 0;
                    for hop in &route {
                        assert_eq!(hop.range.start, layer, "trial {trial}: contiguous");
                        let r = c[hop.server].range;
                        assert!(
                            r.start <= hop.range.start && hop.range.end <= r.end,
                            "trial {trial}: hop within its server"
                        );
                        layer = hop.range.end;
                    }
                    assert_eq!(layer, block_count, "trial {trial}: covers the model");
                }
                Err(RouteError::Missing(m)) => assert_eq!(m, missing, "trial {trial}"),
            }
        }
    }
}
