//! Routing on what this client measured, not on what servers claim.
//!
//! A server announces its own throughput, and a route prefers fast servers; a server
//! that claimed 10^38 tokens/s would win every route. So the router uses, for each
//! server, the speed this process has measured on its own steps through it; and for a
//! server it has not used yet, the announced figure capped at a ceiling drawn from
//! what it has measured of others, or where it has measured nothing, from the median
//! of all announcements (which a lone liar cannot move).

use std::collections::HashMap;
use std::hash::Hash;

/// Weight of a new measurement in a server's running average.
const NEW_WEIGHT: f64 = 0.2;
/// An unmeasured server may claim at most this many times the fastest measured one.
const CLAIM_HEADROOM: f64 = 2.0;
/// Servers remembered; past this, the least measured are forgotten first.
const MAX_REMEMBERED: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Speed {
    /// Milliseconds per position per layer, a running average over decode steps.
    ms_per_layer: f64,
    samples: u32,
}

/// One process's measurements of the servers its sessions used.
#[derive(Debug)]
pub struct Measured<P> {
    speeds: HashMap<P, Speed>,
}

impl<P> Default for Measured<P> {
    fn default() -> Self {
        Self {
            speeds: HashMap::new(),
        }
    }
}

impl<P: Eq + Hash + Clone> Measured<P> {
    /// A decode step through `layers` of `peer`'s layers took `elapsed_ms` from the
    /// moment its input was sent (or the previous server's output arrived) to the
    /// arrival of its output.
    pub fn record(&mut self, peer: &P, layers: u32, elapsed_ms: f64) {
        if layers == 0 || !elapsed_ms.is_finite() || elapsed_ms < 0.0 {
            return;
        }
        let sample = elapsed_ms / layers as f64;
        if !self.speeds.contains_key(peer) && self.speeds.len() >= MAX_REMEMBERED {
            let least = self
                .speeds
                .iter()
                .min_by_key(|(_, s)| s.samples)
                .map(|(p, _)| p.clone());
            if let Some(least) = least {
                self.speeds.remove(&least);
            }
        }
        let speed = self.speeds.entry(peer.clone()).or_insert(Speed {
            ms_per_layer: sample,
            samples: 0,
        });
        speed.ms_per_layer += NEW_WEIGHT * (sample - speed.ms_per_layer);
        speed.samples = speed.samples.saturating_add(1);
    }

    /// Tokens/s through `hosted_layers` layers of `peer`, as measured.
    pub fn throughput(&self, peer: &P, hosted_layers: u32) -> Option<f64> {
        let speed = self.speeds.get(peer)?;
        Some(1000.0 / (speed.ms_per_layer.max(1e-6) * hosted_layers.max(1) as f64))
    }

    /// The throughputs to route by for `servers` (each a peer, its hosted layers and
    /// its announced tokens/s), in the same order.
    pub fn routing_throughputs(&self, servers: &[(P, u32, f64)]) -> Vec<f64> {
        let measured: Vec<Option<f64>> = servers
            .iter()
            .map(|(peer, layers, _)| self.throughput(peer, *layers))
            .collect();
        // Claims compared per layer, so servers of different ranges are comparable.
        let per_layer = |t: f64, layers: u32| t * layers.max(1) as f64;
        let fastest_measured = servers
            .iter()
            .zip(&measured)
            .filter_map(|((_, layers, _), m)| m.map(|t| per_layer(t, *layers)))
            .fold(None, |best: Option<f64>, t| {
                Some(best.map_or(t, |b| b.max(t)))
            });
        let ceiling = match fastest_measured {
            Some(fastest) => fastest * CLAIM_HEADROOM,
            None => median(servers.iter().map(|(_, layers, t)| per_layer(*t, *layers))),
        };
        servers
            .iter()
            .zip(measured)
            .map(|((_, layers, announced), measured)| {
                measured.unwrap_or_else(|| {
                    let claim = if announced.is_finite() {
                        *announced
                    } else {
                        0.0
                    };
                    claim.clamp(0.0, ceiling / (*layers).max(1) as f64)
                })
            })
            .collect()
    }
}

/// The median of `values` (the lower one of an even count, so that one liar among
/// two servers is held to the other's claim); 0 for none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.filter(|v| v.is_finite() && *v > 0.0).collect();
    values.sort_by(f64::total_cmp);
    values
        .get(values.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_liar_is_held_to_the_median_of_claims() {
        let m = Measured::default();
        let servers = [(1, 30, 100.0), (2, 30, 120.0), (3, 30, 3e38)];
        let t = m.routing_throughputs(&servers);
        assert_eq!(t[..2], [100.0, 120.0]);
        assert_eq!(t[2], 120.0, "capped at the median claim");
        let pair = m.routing_throughputs(&[(1, 30, 100.0), (3, 30, 3e38)]);
        assert_eq!(
            pair,
            [100.0, 100.0],
            "one liar among two is held to the other"
        );
    }

    #[test]
    fn measurements_replace_claims_and_cap_the_unmeasured() {
        let mut m = Measured::default();
        // Server 1: 10 ms for 30 layers per decode step, i.e. 100 tokens/s.
        for _ in 0..20 {
            m.record(&1, 30, 10.0);
        }
        let t1 = m.throughput(&1, 30).unwrap();
        assert!((t1 - 100.0).abs() < 1e-9, "{t1}");
        // Server 2 claimed 10x more than it does: after one measured step of 100 ms
        // its figure moves to the measurement.
        m.record(&2, 30, 100.0);
        let servers = [(1, 30, 100.0), (2, 30, 1000.0), (3, 15, 1e9)];
        let t = m.routing_throughputs(&servers);
        assert!((t[1] - 10.0).abs() < 1e-9, "{t:?}");
        // Server 3, unmeasured, hosts 15 layers: at most twice the fastest measured
        // speed per layer (100 tokens/s × 30 layers), over its 15.
        assert!((t[2] - 400.0).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn averages_move_with_new_measurements_and_ignore_garbage() {
        let mut m = Measured::default();
        m.record(&1, 10, 10.0);
        m.record(&1, 10, f64::NAN);
        m.record(&1, 0, 5.0);
        assert!((m.throughput(&1, 10).unwrap() - 100.0).abs() < 1e-9);
        for _ in 0..50 {
            m.record(&1, 10, 20.0);
        }
        assert!((m.throughput(&1, 10).unwrap() - 50.0).abs() < 0.01);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut m = Measured::default();
        for peer in 0..MAX_REMEMBERED + 10 {
            m.record(&peer, 1, 1.0);
        }
        assert_eq!(m.speeds.len(), MAX_REMEMBERED);
    }
}
