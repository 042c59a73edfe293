//! Which addresses from a server's announcement this node dials. Anyone can announce
//! a server, so an announcement's addresses must not turn every node that reads it
//! into a reflector (thousands of dials to one victim) or a scanner of its own networks
//! (dials to loopback, the LAN, link-local services). Pure; fed by the event loop.

use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// Most addresses of one announcement that are dialled: a server has a few (TCP and
/// QUIC, IPv4 and IPv6, a relayed one or two).
pub const MAX_DIALLED_PER_ANNOUNCEMENT: usize = 8;

/// Where an address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Global,
    /// This machine.
    Loopback,
    /// A network of its own: RFC 1918 blocks, carrier-grade NAT's shared block, IPv6
    /// unique-local addresses, link-local ones. Numbered so that only the same block
    /// matches.
    Local(u8),
    /// Nothing to dial (unspecified, multicast, broadcast).
    Never,
}

/// The announced addresses worth dialling, at most [`MAX_DIALLED_PER_ANNOUNCEMENT`]:
/// those on the internet, and those of a local kind (loopback, a private LAN) only where
/// a peer this node is connected to reaches it from a network of that kind (`peers`,
/// their addresses), as in a LAN swarm or tests on one machine. Not where this node
/// merely listens: one listening on every interface has loopback and LAN addresses
/// whether or not any peer is there. Names (`/dns`, `/dnsaddr`) are never taken from
/// announcements: they would make this node resolve, and dial, whatever they point at.
pub fn worth_dialling(announced: &[Multiaddr], peers: &[IpAddr]) -> Vec<Multiaddr> {
    let own: Vec<Scope> = peers.iter().map(|ip| scope(*ip)).collect();
    announced
        .iter()
        .filter(|addr| match scope_of(addr) {
            Some(Scope::Global) => true,
            Some(Scope::Never) | None => false,
            Some(local) => own.contains(&local),
        })
        .take(MAX_DIALLED_PER_ANNOUNCEMENT)
        .cloned()
        .collect()
}

/// The scope of the first host an address leads to (for a relayed address, the
/// relay's), or none if it names a host by name or has no IP address.
fn scope_of(addr: &Multiaddr) -> Option<Scope> {
    for protocol in addr.iter() {
        match protocol {
            Protocol::Ip4(ip) => return Some(scope(IpAddr::V4(ip))),
            Protocol::Ip6(ip) => return Some(scope(IpAddr::V6(ip))),
            Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_) => {
                return None
            }
            _ => {}
        }
    }
    None
}

fn scope(ip: IpAddr) -> Scope {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() {
                Scope::Never
            } else if v4.is_loopback() {
                Scope::Loopback
            } else if a == 10 {
                Scope::Local(0)
            } else if a == 172 && (16..32).contains(&b) {
                Scope::Local(1)
            } else if a == 192 && b == 168 {
                Scope::Local(2)
            } else if a == 100 && (64..128).contains(&b) {
                Scope::Local(3)
            } else if v4.is_link_local() {
                Scope::Local(4)
            } else {
                Scope::Global
            }
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => scope(IpAddr::V4(v4)),
            None if v6.is_unspecified() || v6.is_multicast() => Scope::Never,
            None if v6.is_loopback() => Scope::Loopback,
            None if v6.segments()[0] & 0xfe00 == 0xfc00 => Scope::Local(5),
            None if v6.segments()[0] & 0xffc0 == 0xfe80 => Scope::Local(6),
            None => Scope::Global,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn internet_addresses_are_dialled_local_ones_only_from_the_same_kind_of_network() {
        let announced = addrs(&[
            "/ip4/198.18.1.2/tcp/4001",
            "/ip4/127.0.0.1/tcp/22",
            "/ip4/10.0.0.7/tcp/4001",
            "/ip4/192.168.1.1/tcp/80",
            "/ip4/169.254.169.254/tcp/80",
            "/ip6/fe80::1/tcp/4001",
            "/ip6/2001:db8::1/udp/4001/quic-v1",
            "/ip4/0.0.0.0/tcp/4001",
        ]);
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        let on_the_internet = [ip("203.0.113.9")];
        assert_eq!(
            worth_dialling(&announced, &on_the_internet),
            addrs(&[
                "/ip4/198.18.1.2/tcp/4001",
                "/ip6/2001:db8::1/udp/4001/quic-v1"
            ])
        );
        let on_a_lan = [ip("127.0.0.1"), ip("10.1.0.2")];
        assert_eq!(
            worth_dialling(&announced, &on_a_lan),
            addrs(&[
                "/ip4/198.18.1.2/tcp/4001",
                "/ip4/127.0.0.1/tcp/22",
                "/ip4/10.0.0.7/tcp/4001",
                "/ip6/2001:db8::1/udp/4001/quic-v1",
            ])
        );
    }

    #[test]
    fn names_are_never_taken_from_announcements_and_relays_count_by_their_address() {
        let announced = addrs(&[
            "/dns4/internal.example/tcp/4001",
            "/dnsaddr/example.org",
            "/ip4/198.18.1.2/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
            "/ip4/10.9.9.9/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        ]);
        let peers = ["203.0.113.9".parse().unwrap()];
        assert_eq!(worth_dialling(&announced, &peers), announced[2..3].to_vec());
    }

    #[test]
    fn at_most_eight_addresses_of_one_announcement_are_dialled() {
        let announced: Vec<Multiaddr> = (1..=32)
            .map(|i| format!("/ip4/198.18.{i}.2/tcp/4001").parse().unwrap())
            .collect();
        let dialled = worth_dialling(&announced, &[]);
        assert_eq!(dialled, announced[..MAX_DIALLED_PER_ANNOUNCEMENT].to_vec());
    }
}
