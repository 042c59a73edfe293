//! `--layers auto`: which layers a joining server should host, given what the swarm
//! already serves. Like Petals, it picks the window the swarm covers least.

use allmende_protocol::LayerRange;

/// For each layer of the model, the number of servers hosting it and their summed
/// throughput.
pub fn coverage(ranges: &[(LayerRange, f64)], block_count: u32) -> Vec<(u32, f64)> {
    let mut cover = vec![(0u32, 0.0f64); block_count as usize];
    for (range, throughput) in ranges {
        for layer in range.start.min(block_count)..range.end.min(block_count) {
            let c = &mut cover[layer as usize];
            c.0 += 1;
            c.1 += throughput.max(0.0);
        }
    }
    cover
}

/// The window of `min(max_layers, block_count)` layers that the swarm covers least:
/// fewest servers summed over the window, then lowest summed throughput, then the
/// earliest start.
pub fn choose_layers(
    ranges: &[(LayerRange, f64)],
    block_count: u32,
    max_layers: u32,
) -> LayerRange {
    let width = max_layers.clamp(1, block_count.max(1));
    let cover = coverage(ranges, block_count);
    let score = |start: u32| {
        let window = &cover[start as usize..(start + width) as usize];
        let servers: u32 = window.iter().map(|c| c.0).sum();
        let throughput: f64 = window.iter().map(|c| c.1).sum();
        (servers, throughput)
    };
    let mut best = 0;
    for start in 1..=block_count.saturating_sub(width) {
        let (s, t) = score(start);
        let (bs, bt) = score(best);
        if s < bs || (s == bs && t < bt) {
            best = start;
        }
    }
    LayerRange::new(best, best + width)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::missing_ranges;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn fills_the_model_in_order_when_joining_one_by_one() {
        let mut swarm = Vec::new();
        for expected in [(0, 10), (10, 20), (20, 30)] {
            let r = choose_layers(&swarm, 30, 10);
            assert_eq!((r.start, r.end), expected);
            swarm.push((r, 50.0));
        }
        // A fourth server replicates the least-served window: all equal, so the start,
        // unless throughput differs.
        swarm[1].1 = 5.0;
        assert_eq!(choose_layers(&swarm, 30, 10), LayerRange::new(10, 20));
    }

    #[test]
    fn covers_a_gap_first() {
        let swarm = [
            (LayerRange::new(0, 12), 50.0),
            (LayerRange::new(20, 30), 50.0),
        ];
        let r = choose_layers(&swarm, 30, 8);
        assert_eq!(r, LayerRange::new(12, 20));
    }

    #[test]
    fn clamps_the_width() {
        assert_eq!(choose_layers(&[], 30, 100), LayerRange::new(0, 30));
        assert_eq!(choose_layers(&[], 30, 0), LayerRange::new(0, 1));
    }

    #[test]
    fn simulated_joins_cover_the_model_with_the_fewest_servers() {
        let mut rng = SmallRng::seed_from_u64(11);
        for _ in 0..200 {
            let block_count: u32 = rng.random_range(1..=100);
            let width = rng.random_range(1..=block_count);
            let mut swarm = Vec::new();
            let needed = block_count.div_ceil(width);
            for _ in 0..needed {
                let r = choose_layers(&swarm, block_count, width);
                assert_eq!(r.len(), width);
                assert!(r.end <= block_count);
                swarm.push((r, rng.random_range(1.0..100.0)));
            }
            let ranges: Vec<LayerRange> = swarm.iter().map(|s| s.0).collect();
            assert!(
                missing_ranges(ranges.clone(), block_count).is_empty(),
                "{block_count} layers, width {width}: {ranges:?}"
            );
        }
    }
}
