//! Choosing among the answers to a record lookup. Every answer that verifies was
//! signed by the server it names, but any node on the path may hand back an older one
//! it kept (a server's previous address or layers, or its announcement from before it
//! started draining). So a lookup hears several genuine answers and takes the newest,
//! waiting for more only a little after the first: a lookup that waited for every
//! node on its path would wait for the slowest.

use std::time::{Duration, Instant};

/// Genuine answers a lookup waits for before it takes the newest (fewer if the
/// lookup ends first): this node's own copy, and the closest nodes'.
pub const ANSWERS: usize = 3;

/// How long after the first genuine answer a lookup waits for more.
pub const GRACE: Duration = Duration::from_secs(1);

/// The newest genuine answer to one lookup so far.
#[derive(Debug, Default)]
pub struct Newest {
    best: Option<(u64, Vec<u8>)>,
    answers: usize,
    first: Option<Instant>,
}

impl Newest {
    /// Takes a genuine answer issued at `issued_at`, heard at `now`; returns whether
    /// enough have come.
    pub fn offer(&mut self, now: Instant, issued_at: u64, value: Vec<u8>) -> bool {
        self.answers += 1;
        self.first.get_or_insert(now);
        if self.best.as_ref().is_none_or(|(at, _)| issued_at > *at) {
            self.best = Some((issued_at, value));
        }
        self.answers >= ANSWERS
    }

    /// An answer came, and waiting for more took long enough.
    pub fn overdue(&self, now: Instant) -> bool {
        self.first
            .is_some_and(|first| now.duration_since(first) >= GRACE)
    }

    /// The newest answer, if any came.
    pub fn take(self) -> Option<Vec<u8>> {
        self.best.map(|(_, value)| value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_newest_of_several_answers() {
        let now = Instant::now();
        let mut newest = Newest::default();
        assert!(!newest.overdue(now + GRACE), "no answer yet");
        assert!(!newest.offer(now, 100, b"fresh".to_vec()));
        assert!(!newest.offer(now, 40, b"stale".to_vec()));
        assert!(!newest.overdue(now));
        assert!(newest.overdue(now + GRACE));
        assert!(newest.offer(now, 100, b"same age, later".to_vec()));
        assert_eq!(newest.take().unwrap(), b"fresh");

        let mut newest = Newest::default();
        newest.offer(now, 10, b"old".to_vec());
        newest.offer(now, 20, b"new".to_vec());
        assert_eq!(newest.take().unwrap(), b"new");
        assert_eq!(Newest::default().take(), None);
    }
}
