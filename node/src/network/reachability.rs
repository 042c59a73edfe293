//! Whether others can reach this node, and how: what AutoNAT, relay reservations,
//! UPnP and `--external-address` have confirmed. Pure state, fed by the event loop.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// How long a node may go without a confirmed address before it looks for a relay
/// (AutoNAT probes every few seconds once it has a peer to ask).
pub const PROBE_GRACE: Duration = Duration::from_secs(10);
/// Failed dial-back probes after which a node stops waiting for a confirmation.
const SETTLING_FAILURES: u32 = 2;
/// Relays a node behind NAT reserves a slot on: two, so losing one leaves an address.
pub const WANTED_RELAYS: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reachability {
    /// Still finding out.
    Unknown,
    /// Peers dialled one of its addresses back.
    Public,
    /// Not reachable directly, but through a relay (peers may still hole-punch).
    BehindNat,
    /// Neither reachable nor relayed: only peers it dials itself can use it.
    Unreachable,
}

impl Reachability {
    /// The sentence a log or status line shows.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Unknown => "reachability not known yet",
            Self::Public => "publicly reachable",
            Self::BehindNat => "behind NAT, reachable through a relay",
            Self::Unreachable => {
                "not reachable: no address was confirmed from outside and no relay took a \
                 reservation; only peers this node dials can use it (forward a port and pass \
                 --external-address, try --upnp, or make sure a public node with the relay \
                 service is in the swarm)"
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct ReachabilityState {
    direct: BTreeSet<Multiaddr>,
    relayed: BTreeSet<Multiaddr>,
    failed_probes: u32,
    /// When the node first had a peer to ask: the grace period runs from here.
    asking_since: Option<Instant>,
    /// Relays asked for a reservation that have not answered yet.
    relays_pending: BTreeSet<PeerId>,
}

impl ReachabilityState {
    pub fn has_peers(&mut self, now: Instant) {
        self.asking_since.get_or_insert(now);
    }

    pub fn confirmed(&mut self, addr: Multiaddr) {
        match is_relayed(&addr) {
            true => self.relayed.insert(addr),
            false => self.direct.insert(addr),
        };
    }

    pub fn expired(&mut self, addr: &Multiaddr) {
        self.direct.remove(addr);
        self.relayed.remove(addr);
    }

    pub fn probe_failed(&mut self) {
        self.failed_probes += 1;
    }

    /// AutoNAT v1 concluded the node is private: it says so only after several
    /// peers failed to dial back, so it counts as the failed probes that settle it.
    pub fn found_private(&mut self) {
        self.failed_probes = self.failed_probes.max(SETTLING_FAILURES);
    }

    /// A relay was asked for a reservation: until it answers, the node does not call
    /// itself unreachable.
    pub fn relay_asked(&mut self, relay: PeerId) {
        self.relays_pending.insert(relay);
    }

    /// The relay answered: it holds a slot, or it refused, or it is gone.
    pub fn relay_answered(&mut self, relay: &PeerId) {
        self.relays_pending.remove(relay);
    }

    pub fn status(&self, now: Instant) -> Reachability {
        if !self.direct.is_empty() {
            Reachability::Public
        } else if !self.relayed.is_empty() {
            Reachability::BehindNat
        } else if self.gave_up_waiting(now) && self.relays_pending.is_empty() {
            Reachability::Unreachable
        } else {
            Reachability::Unknown
        }
    }

    fn gave_up_waiting(&self, now: Instant) -> bool {
        self.failed_probes >= SETTLING_FAILURES
            || self
                .asking_since
                .is_some_and(|since| now.duration_since(since) >= PROBE_GRACE)
    }

    /// Whether to reserve slots on relays: not confirmed reachable, and either a
    /// probe failed or the grace period is over. A node confirmed reachable later
    /// keeps its reservations (they cost the relay little) but announces its
    /// direct address first.
    pub fn wants_relay(&self, now: Instant) -> bool {
        self.direct.is_empty() && (self.failed_probes >= 1 || self.gave_up_waiting(now))
    }

    /// Addresses to announce: the confirmed ones, direct before relayed. Until
    /// something is confirmed, the listen addresses (peers on the same network may
    /// reach them); once the node knows it is unreachable, none.
    pub fn announced(&self, listen: &[Multiaddr], now: Instant) -> Vec<Multiaddr> {
        match self.status(now) {
            Reachability::Public | Reachability::BehindNat => {
                self.direct.iter().chain(&self.relayed).cloned().collect()
            }
            Reachability::Unknown => listen.to_vec(),
            Reachability::Unreachable => Vec::new(),
        }
    }
}

pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// A peer this node could reserve a relay slot on.
#[derive(Clone, Debug, PartialEq)]
pub struct RelayCandidate<P> {
    pub peer: P,
    /// It offers the relay service (its identify lists the hop protocol).
    pub offers_relay: bool,
    /// This node dialled it at an address and reached it, not through a relay and
    /// not by hole punching: evidence that others can reach it too.
    pub dialled_directly: bool,
    /// The round trip to it, once measured: every step relayed through it pays the
    /// way there and back on top of the way to the client.
    pub rtt_ms: Option<f64>,
}

/// The relays to reserve on now: candidates that offer the service and were reached
/// directly, not already in use, nearest first (unmeasured ones last), until
/// `WANTED_RELAYS` are held.
pub fn choose_relays<P: Clone + PartialEq>(
    candidates: &[RelayCandidate<P>],
    in_use: &[P],
) -> Vec<P> {
    let missing = WANTED_RELAYS.saturating_sub(in_use.len());
    let mut eligible: Vec<&RelayCandidate<P>> = candidates
        .iter()
        .filter(|c| c.offers_relay && c.dialled_directly && !in_use.contains(&c.peer))
        .collect();
    eligible.sort_by(|a, b| {
        let rtt = |c: &RelayCandidate<P>| c.rtt_ms.unwrap_or(f64::INFINITY);
        rtt(a).total_cmp(&rtt(b))
    });
    eligible
        .into_iter()
        .map(|c| c.peer.clone())
        .take(missing)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    const DIRECT: &str = "/ip4/198.18.1.2/tcp/4001";
    const RELAYED: &str = "/ip4/198.18.1.2/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";

    #[test]
    fn a_confirmed_direct_address_makes_a_node_public() {
        let now = Instant::now();
        let mut state = ReachabilityState::default();
        assert_eq!(state.status(now), Reachability::Unknown);
        state.confirmed(addr(DIRECT));
        assert_eq!(state.status(now), Reachability::Public);
        assert!(!state.wants_relay(now + PROBE_GRACE * 10));
        state.expired(&addr(DIRECT));
        assert_eq!(state.status(now), Reachability::Unknown);
    }

    #[test]
    fn a_node_nobody_dials_back_looks_for_a_relay_then_says_it_is_behind_nat() {
        let start = Instant::now();
        let mut state = ReachabilityState::default();
        state.has_peers(start);
        assert!(!state.wants_relay(start));
        assert!(state.wants_relay(start + PROBE_GRACE));
        assert_eq!(state.status(start + PROBE_GRACE), Reachability::Unreachable);
        let listen = [addr("/ip4/10.1.0.2/tcp/4001")];
        assert!(state.announced(&listen, start + PROBE_GRACE).is_empty());
        state.confirmed(addr(RELAYED));
        assert_eq!(state.status(start + PROBE_GRACE), Reachability::BehindNat);
        assert_eq!(state.announced(&listen, start), vec![addr(RELAYED)]);
    }

    #[test]
    fn one_failed_probe_starts_the_relay_search_two_settle_it() {
        let now = Instant::now();
        let mut state = ReachabilityState::default();
        state.probe_failed();
        assert!(state.wants_relay(now));
        assert_eq!(state.status(now), Reachability::Unknown);
        state.probe_failed();
        assert_eq!(state.status(now), Reachability::Unreachable);
        state.relay_asked(PeerId::random());
        assert_eq!(
            state.status(now),
            Reachability::Unknown,
            "a relay may answer yet"
        );
    }

    #[test]
    fn until_something_is_confirmed_the_listen_addresses_are_announced() {
        let now = Instant::now();
        let state = ReachabilityState::default();
        let listen = [addr("/ip4/127.0.0.1/tcp/4001")];
        assert_eq!(state.announced(&listen, now), listen.to_vec());
    }

    #[test]
    fn direct_addresses_are_announced_before_relayed_ones() {
        let now = Instant::now();
        let mut state = ReachabilityState::default();
        state.confirmed(addr(RELAYED));
        state.confirmed(addr(DIRECT));
        assert_eq!(state.announced(&[], now), vec![addr(DIRECT), addr(RELAYED)]);
    }

    #[test]
    fn relays_are_peers_that_offer_the_service_and_were_reached_directly() {
        let candidate = |peer, offers_relay, dialled_directly| RelayCandidate {
            peer,
            offers_relay,
            dialled_directly,
            rtt_ms: None,
        };
        let candidates = [
            candidate(1, true, false), // reached through a relay or a hole punch
            candidate(2, false, true), // --no-relay-service
            candidate(3, true, true),
            candidate(4, true, true),
            candidate(5, true, true),
        ];
        assert_eq!(choose_relays(&candidates, &[]), vec![3, 4]);
        assert_eq!(choose_relays(&candidates, &[3]), vec![4]);
        assert_eq!(choose_relays(&candidates, &[3, 4]), Vec::<i32>::new());
    }

    #[test]
    fn the_nearest_relays_are_chosen_first() {
        let candidate = |peer, rtt_ms| RelayCandidate {
            peer,
            offers_relay: true,
            dialled_directly: true,
            rtt_ms,
        };
        let candidates = [
            candidate(1, None),
            candidate(2, Some(80.0)),
            candidate(3, Some(12.0)),
            candidate(4, Some(40.0)),
        ];
        assert_eq!(choose_relays(&candidates, &[]), vec![3, 4]);
        assert_eq!(choose_relays(&candidates, &[3]), vec![4]);
        let unmeasured = [candidate(1, None), candidate(2, None)];
        assert_eq!(choose_relays(&unmeasured, &[]), vec![1, 2]);
    }
}
