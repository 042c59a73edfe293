//! The IP address each connected peer reaches this node from, so that the server can
//! give fair shares to groups of peers by address (`server::share`): a peer id is free
//! to make, an address is not.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// Peers counted together: by address, since peer ids are free to make and addresses
/// are not (see `server::share`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerGroup {
    /// An IPv4 address, or the upper 64 bits of an IPv6 one.
    Net(u128),
    /// A peer on loopback, or one whose address is unknown.
    Peer(PeerId),
}

impl PeerGroup {
    pub fn of(peer: PeerId, address: Option<IpAddr>) -> Self {
        match address {
            Some(ip) if ip.is_loopback() => PeerGroup::Peer(peer),
            Some(IpAddr::V4(v4)) => PeerGroup::Net(u32::from(v4) as u128),
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerGroup::Net(u32::from(v4) as u128),
                None => PeerGroup::Net(u128::from(v6) >> 64 << 64 | 1 << 32),
            },
            None => PeerGroup::Peer(peer),
        }
    }
}

/// Connected peers' remote addresses; written by the event loop, read by the server.
#[derive(Clone, Default)]
pub struct PeerAddresses(Arc<Mutex<HashMap<PeerId, IpAddr>>>);

impl PeerAddresses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, IpAddr>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address `peer`'s latest connection came from, while it is connected.
    pub fn get(&self, peer: &PeerId) -> Option<IpAddr> {
        self.lock().get(peer).copied()
    }

    /// The addresses connected peers reach this node from.
    pub(super) fn all(&self) -> Vec<IpAddr> {
        self.lock().values().copied().collect()
    }

    pub(super) fn connected(&self, peer: PeerId, remote: &Multiaddr) {
        if let Some(ip) = ip_of(remote) {
            self.lock().insert(peer, ip);
        }
    }

    pub(super) fn disconnected(&self, peer: &PeerId) {
        self.lock().remove(peer);
    }
}

/// The IP address a multiaddress starts with, if any. A relayed address
/// (`/ip4/R/.../p2p-circuit/...`) gives the relay's: its users share it.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_ip_of_an_address() {
        let addr = |s: &str| s.parse::<Multiaddr>().unwrap();
        assert_eq!(
            ip_of(&addr("/ip4/198.51.100.4/tcp/4001")),
            Some("198.51.100.4".parse().unwrap())
        );
        assert_eq!(
            ip_of(&addr("/ip6/2001:db8::1/udp/4001/quic-v1")),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(ip_of(&addr("/dns4/example.org/tcp/1")), None);
    }

    #[test]
    fn addresses_group_peers() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(
            PeerGroup::of(a, ip("203.0.113.7")),
            PeerGroup::of(b, ip("203.0.113.7"))
        );
        assert_ne!(
            PeerGroup::of(a, ip("203.0.113.7")),
            PeerGroup::of(a, ip("203.0.113.8"))
        );
        assert_eq!(
            PeerGroup::of(a, ip("2001:db8:1:2::5")),
            PeerGroup::of(b, ip("2001:db8:1:2:ffff::9"))
        );
        assert_eq!(
            PeerGroup::of(a, ip("::ffff:203.0.113.7")),
            PeerGroup::of(b, ip("203.0.113.7"))
        );
        assert_ne!(
            PeerGroup::of(a, ip("127.0.0.1")),
            PeerGroup::of(b, ip("127.0.0.1"))
        );
        assert_eq!(PeerGroup::of(a, None), PeerGroup::Peer(a));
    }
}
