//! Joining through bootstrap addresses, and rejoining: a node started before its
//! bootstrap node, or one whose bootstrap node restarted, keeps dialling with backoff
//! for as long as it is connected to no bootstrap node, and says what it is waiting
//! for.

use std::time::{Duration, Instant};

use libp2p::Multiaddr;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// The wait before retry `attempt` (1, 2, ...): doubling from 1 s up to 30 s.
pub fn backoff(attempt: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(LONGEST_WAIT)
}

#[derive(Debug)]
pub struct Bootstrap {
    addrs: Vec<Multiaddr>,
    /// Dial rounds since the node last knew a peer.
    attempts: u32,
    next: Instant,
}

impl Bootstrap {
    /// `addrs` are first dialled at `first`: once the node listens, so that its
    /// dials leave from its listening port and a NAT maps that port (which hole
    /// punching relies on).
    pub fn new(addrs: Vec<Multiaddr>, first: Instant) -> Self {
        Self {
            next: first,
            addrs,
            attempts: 0,
        }
    }

    /// Every listener is up: the first dial need not wait any longer.
    pub fn listening(&mut self, now: Instant) {
        if self.attempts == 0 {
            self.next = self.next.min(now);
        }
    }

    /// The addresses to dial now, if the node is connected to no bootstrap node and
    /// the wait is over.
    pub fn due(&mut self, joined: bool, now: Instant) -> Option<&[Multiaddr]> {
        if joined {
            self.attempts = 0;
            return None;
        }
        if self.addrs.is_empty() || now < self.next {
            return None;
        }
        self.attempts += 1;
        self.next = now + backoff(self.attempts);
        Some(&self.addrs)
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    pub fn next_wait(&self, now: Instant) -> Duration {
        self.next.saturating_duration_since(now)
    }
}

/// Bootstrap addresses from a file: one multiaddress per line; `#` starts a comment.
pub fn parse_list(text: &str) -> Result<Vec<Multiaddr>, String> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i, line.split('#').next().unwrap_or("").trim()))
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            line.parse()
                .map_err(|e| format!("line {}: {line:?} is not a multiaddress: {e}", i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_thirty_seconds() {
        let waits: Vec<u64> = (1..=8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), LONGEST_WAIT);
    }

    #[test]
    fn a_node_without_peers_redials_and_one_with_peers_starts_over() {
        let t = Instant::now();
        let addr: Multiaddr = "/dns4/bootstrap.example/tcp/4001".parse().unwrap();
        let mut boot = Bootstrap::new(vec![addr.clone()], t);
        assert_eq!(boot.due(false, t), Some(&[addr.clone()][..]));
        assert!(boot.due(false, t).is_none(), "dialled at start");
        assert_eq!(boot.due(false, t + backoff(1)), Some(&[addr.clone()][..]));
        assert_eq!(boot.attempts(), 2);
        assert!(boot.due(false, t + backoff(1)).is_none());
        assert_eq!(boot.next_wait(t + backoff(1)), backoff(2));
        // Joined: no dialling; lost every peer later: dialling again at once.
        assert!(boot.due(true, t + LONGEST_WAIT).is_none());
        assert_eq!(boot.attempts(), 0);
        assert!(boot.due(false, t + LONGEST_WAIT).is_some());
    }

    #[test]
    fn the_first_dial_goes_once_the_listeners_are_up() {
        let t = Instant::now();
        let addr: Multiaddr = "/ip4/198.18.0.1/tcp/4001".parse().unwrap();
        let mut boot = Bootstrap::new(vec![addr], t + Duration::from_millis(500));
        assert!(boot.due(false, t).is_none(), "waits for the listeners");
        boot.listening(t);
        assert!(boot.due(false, t).is_some());
        // Later listeners do not hurry a retry.
        boot.listening(t);
        assert!(boot.due(false, t).is_none());
    }

    #[test]
    fn no_addresses_no_dialling() {
        let t = Instant::now();
        let mut boot = Bootstrap::new(vec![], t);
        assert!(boot.due(false, t + LONGEST_WAIT).is_none());
    }

    #[test]
    fn lists_skip_comments_and_blank_lines_and_name_bad_lines() {
        let text = "# public nodes\n/ip4/198.18.0.1/tcp/4001\n\n/dns4/a.example/udp/4001/quic-v1  # second\n";
        assert_eq!(parse_list(text).unwrap().len(), 2);
        let err = parse_list("/ip4/1.2.3.4/tcp/1\nnot an address\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }
}
