//! The connections to each peer and what kind of path each is: dialled directly,
//! hole-punched, or relayed, with its measured round trip. Pure state, fed by the
//! event loop; it decides which path streams should use and when a path is settled.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use allmende_protocol::inference::{ForwardLink, LinkKind};

/// After a relayed connection opens, how long to wait for a hole punch to replace it
/// before using it as it is.
pub const PUNCH_PATIENCE: Duration = Duration::from_secs(4);

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    Direct,
    HolePunched,
    Relayed,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct PathInfo {
    pub kind: PathKind,
    pub rtt_ms: Option<f64>,
}

impl From<PathInfo> for ForwardLink {
    fn from(path: PathInfo) -> ForwardLink {
        ForwardLink {
            kind: match path.kind {
                PathKind::Direct => LinkKind::Direct,
                PathKind::HolePunched => LinkKind::HolePunched,
                PathKind::Relayed => LinkKind::Relayed,
            },
            rtt_us: path
                .rtt_ms
                .map(|ms| (ms * 1e3).clamp(0.0, u32::MAX as f64) as u32),
        }
    }
}

impl PathInfo {
    /// The path a server reported for its link to the next server; none if it did not
    /// know the link's kind.
    pub fn from_link(link: ForwardLink) -> Option<PathInfo> {
        let kind = match link.kind {
            LinkKind::Direct => PathKind::Direct,
            LinkKind::HolePunched => PathKind::HolePunched,
            LinkKind::Relayed => PathKind::Relayed,
            LinkKind::Unknown => return None,
        };
        Some(PathInfo {
            kind,
            rtt_ms: link.rtt_us.map(|us| f64::from(us) / 1e3),
        })
    }
}

#[derive(Debug)]
struct Connection<P> {
    peer: P,
    kind: PathKind,
    /// This node dialled it (as opposed to accepting it).
    dialled: bool,
    opened: Instant,
    rtt: Option<Duration>,
}

#[derive(Debug)]
pub struct Paths<C, P> {
    connections: HashMap<C, Connection<P>>,
    /// Peers whose hole punch failed since their relayed connection opened.
    punch_failed: Vec<P>,
}

impl<C, P> Default for Paths<C, P> {
    fn default() -> Self {
        Self {
            connections: HashMap::new(),
            punch_failed: Vec::new(),
        }
    }
}

impl<C: Copy + Eq + Hash, P: Copy + Eq> Paths<C, P> {
    pub fn opened(&mut self, id: C, peer: P, kind: PathKind, dialled: bool, now: Instant) {
        self.connections.insert(
            id,
            Connection {
                peer,
                kind,
                dialled,
                opened: now,
                rtt: None,
            },
        );
    }

    /// A hole punch made this connection: it was opened as a dial, but it is no
    /// evidence that the peer can be dialled by others.
    pub fn punched(&mut self, id: C) {
        if let Some(c) = self.connections.get_mut(&id) {
            c.kind = PathKind::HolePunched;
        }
    }

    pub fn punch_failed(&mut self, peer: P) {
        if !self.punch_failed.contains(&peer) {
            self.punch_failed.push(peer);
        }
    }

    pub fn closed(&mut self, id: &C) {
        if let Some(c) = self.connections.remove(id) {
            if !self.is_connected(c.peer) {
                self.punch_failed.retain(|p| *p != c.peer);
            }
        }
    }

    pub fn measured(&mut self, id: &C, rtt: Duration) {
        if let Some(c) = self.connections.get_mut(id) {
            c.rtt = Some(rtt);
        }
    }

    pub fn is_connected(&self, peer: P) -> bool {
        self.connections.values().any(|c| c.peer == peer)
    }

    /// The path streams to `peer` take: a direct or hole-punched connection when
    /// there is one (the fastest measured), else a relayed one.
    pub fn best(&self, peer: P) -> Option<PathInfo> {
        self.connections
            .values()
            .filter(|c| c.peer == peer)
            .min_by_key(|c| (c.kind == PathKind::Relayed, c.rtt.unwrap_or(Duration::MAX)))
            .map(|c| PathInfo {
                kind: c.kind,
                rtt_ms: c.rtt.map(|r| r.as_secs_f64() * 1e3),
            })
    }

    /// Relayed connections to `peer` that a direct one has replaced: closing them
    /// moves new streams onto the direct path (and frees the relay's circuit).
    pub fn replaced_relays(&self, peer: P) -> Vec<C> {
        let direct = self
            .connections
            .values()
            .any(|c| c.peer == peer && c.kind != PathKind::Relayed);
        match direct {
            true => self
                .connections
                .iter()
                .filter(|(_, c)| c.peer == peer && c.kind == PathKind::Relayed)
                .map(|(id, _)| *id)
                .collect(),
            false => Vec::new(),
        }
    }

    /// The path to `peer` once it is worth opening streams on: a direct one, or a
    /// relayed one after its hole punch failed or had `PUNCH_PATIENCE` to succeed.
    /// `None` while a punch may still replace the relayed connection, or when not
    /// connected.
    pub fn settled(&self, peer: P, now: Instant) -> Option<PathInfo> {
        let best = self.best(peer)?;
        if best.kind != PathKind::Relayed {
            // Until the relayed connections a direct one replaced have closed, a
            // new stream could still land on one of them.
            return self.replaced_relays(peer).is_empty().then_some(best);
        }
        if self.punch_failed.contains(&peer) {
            return Some(best);
        }
        let oldest = self
            .connections
            .values()
            .filter(|c| c.peer == peer)
            .map(|c| c.opened)
            .min()?;
        (now.duration_since(oldest) >= PUNCH_PATIENCE).then_some(best)
    }

    /// Whether this node dialled `peer` directly (not through a relay, not by a
    /// hole punch) and holds that connection now.
    pub fn dialled_directly(&self, peer: P) -> bool {
        self.connections
            .values()
            .any(|c| c.peer == peer && c.dialled && c.kind == PathKind::Direct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hole_punch_replaces_the_relayed_connection() {
        let t = Instant::now();
        let mut paths = Paths::default();
        paths.opened(1, 'a', PathKind::Relayed, true, t);
        assert_eq!(paths.settled('a', t), None, "a punch may still come");
        assert!(paths.replaced_relays('a').is_empty());
        paths.opened(2, 'a', PathKind::Direct, true, t);
        paths.punched(2);
        paths.measured(&2, Duration::from_millis(40));
        assert_eq!(paths.replaced_relays('a'), vec![1]);
        assert_eq!(
            paths.settled('a', t),
            None,
            "the relayed connection is closing"
        );
        paths.closed(&1);
        let path = paths.settled('a', t).unwrap();
        assert_eq!(path.kind, PathKind::HolePunched);
        assert_eq!(path.rtt_ms, Some(40.0));
        assert!(
            !paths.dialled_directly('a'),
            "a punched path proves nothing"
        );
    }

    #[test]
    fn a_relayed_path_settles_when_the_punch_fails_or_takes_too_long() {
        let t = Instant::now();
        let mut paths = Paths::default();
        paths.opened(1, 'a', PathKind::Relayed, true, t);
        assert_eq!(
            paths.settled('a', t + PUNCH_PATIENCE).map(|p| p.kind),
            Some(PathKind::Relayed)
        );
        paths.opened(3, 'b', PathKind::Relayed, true, t);
        paths.punch_failed('b');
        assert_eq!(
            paths.settled('b', t).map(|p| p.kind),
            Some(PathKind::Relayed)
        );
        // A new relayed connection after the old one closed gets a new chance.
        paths.closed(&3);
        paths.opened(4, 'b', PathKind::Relayed, true, t);
        assert_eq!(paths.settled('b', t), None);
    }

    #[test]
    fn the_fastest_direct_connection_is_the_path() {
        let t = Instant::now();
        let mut paths = Paths::default();
        assert_eq!(paths.best('a'), None);
        paths.opened(1, 'a', PathKind::Relayed, true, t);
        paths.measured(&1, Duration::from_millis(5));
        paths.opened(2, 'a', PathKind::Direct, false, t);
        paths.measured(&2, Duration::from_millis(30));
        paths.opened(3, 'a', PathKind::Direct, true, t);
        paths.measured(&3, Duration::from_millis(20));
        assert_eq!(paths.best('a').unwrap().rtt_ms, Some(20.0));
        assert!(paths.dialled_directly('a'));
        paths.closed(&3);
        assert!(!paths.dialled_directly('a'), "it dialled us");
        assert_eq!(paths.best('a').unwrap().kind, PathKind::Direct);
    }

    #[test]
    fn a_reported_link_reads_back_as_the_path_it_was() {
        for kind in [PathKind::Direct, PathKind::HolePunched, PathKind::Relayed] {
            let path = PathInfo {
                kind,
                rtt_ms: Some(12.5),
            };
            assert_eq!(PathInfo::from_link(path.into()), Some(path));
        }
        let unmeasured = PathInfo {
            kind: PathKind::Relayed,
            rtt_ms: None,
        };
        assert_eq!(PathInfo::from_link(unmeasured.into()), Some(unmeasured));
        let unknown = ForwardLink {
            kind: LinkKind::Unknown,
            rtt_us: Some(5),
        };
        assert_eq!(PathInfo::from_link(unknown), None);
    }
}
