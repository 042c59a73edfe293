//! An access link emulated in userspace: delay, jitter, loss and a rate limit per direction.
//!
//! Each direction has a reader thread, which takes a packet from one TUN device and decides
//! when it is due on the other side, and a writer thread, which sleeps until the oldest
//! packet is due and writes it. Both block (in `poll` and on a condition variable), so an
//! idle link costs no CPU, and the writer wakes within tens of microseconds of the due time.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, PipeReader, PipeWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::tun::{wait_readable, Tun};

/// The bottleneck queue of a rate-limited direction, as in a modem or router; a packet that
/// would make it longer is dropped (drop-tail). At 20 Mbit/s this is about 100 ms.
const QUEUE_BYTES: f64 = 256.0 * 1024.0;
/// Bounds the memory held by packets in flight on a link without a rate limit.
const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Larger than any packet a TUN device with MTU 1500 hands out.
const READ_BUFFER: usize = 65_536;

/// How one direction of a link treats packets.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) delay: Duration,
    pub(crate) jitter: Duration,
    pub(crate) loss: f64,
    pub(crate) rate_bps: Option<u64>,
}

/// Counts of one direction of a link since the lab was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionCounters {
    /// Packets delivered to the far side.
    pub packets: u64,
    /// Bytes (IP packets, headers included) delivered to the far side.
    pub bytes: u64,
    /// Packets dropped by random loss, a full queue or a failed write.
    pub dropped: u64,
}

/// Counts of both directions of a site's access link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// From the site to the internet.
    pub up: DirectionCounters,
    /// From the internet to the site.
    pub down: DirectionCounters,
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionCounters {
        DirectionCounters {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

struct Queue {
    packets: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    /// When the rate limiter finishes sending the last admitted packet.
    serialized_until: Instant,
    /// Due time of the last admitted packet: later packets never leave before it, since a
    /// real link does not reorder.
    last_due: Instant,
    rng: u64,
    stop: bool,
}

struct Direction {
    shape: Mutex<Shape>,
    queue: Mutex<Queue>,
    wake: Condvar,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Direction {
    fn new(shape: Shape, seed: u64) -> Direction {
        let now = Instant::now();
        Direction {
            shape: Mutex::new(shape),
            queue: Mutex::new(Queue {
                packets: VecDeque::new(),
                bytes: 0,
                serialized_until: now,
                last_due: now,
                rng: seed | 1,
                stop: false,
            }),
            wake: Condvar::new(),
            counters: Counters::default(),
        }
    }

    /// Queues a packet that arrived at `now` with its due time, or drops it.
    fn admit(&self, packet: Vec<u8>, now: Instant) {
        let shape = *lock(&self.shape);
        let mut q = lock(&self.queue);
        let len = packet.len();
        if shape.loss > 0.0 && next_unit(&mut q.rng) < shape.loss {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut departs = now;
        if let Some(rate) = shape.rate_bps.filter(|&r| r > 0) {
            let start = q.serialized_until.max(now);
            let backlog = (start - now).as_secs_f64() * rate as f64 / 8.0;
            if backlog + len as f64 > QUEUE_BYTES {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            departs = start + Duration::from_nanos(len as u64 * 8 * 1_000_000_000 / rate);
            q.serialized_until = departs;
        }
        if q.bytes + len > MAX_IN_FLIGHT_BYTES {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let jitter = if shape.jitter.is_zero() {
            Duration::ZERO
        } else {
            shape.jitter.mul_f64(next_unit(&mut q.rng))
        };
        let due = (departs + shape.delay + jitter).max(q.last_due);
        q.last_due = due;
        let was_empty = q.packets.is_empty();
        q.bytes += len;
        q.packets.push_back((due, packet));
        drop(q);
        // Only a new head changes when the writer must wake.
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Waits for the head packet's due time; None once the link stops.
    fn next_due(&self) -> Option<Vec<u8>> {
        let mut q = lock(&self.queue);
        loop {
            if q.stop {
                return None;
            }
            let now = Instant::now();
            q = match q.packets.front() {
                None => self.wake.wait(q).unwrap_or_else(PoisonError::into_inner),
                Some(&(due, _)) if due <= now => {
                    let (_, packet) = q.packets.pop_front()?;
                    q.bytes -= packet.len();
                    return Some(packet);
                }
                Some(&(due, _)) => {
                    self.wake
                        .wait_timeout(q, due - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    fn stop(&self) {
        lock(&self.queue).stop = true;
        self.wake.notify_all();
    }
}

/// xorshift64*: loss and jitter need cheap randomness, not good randomness.
fn next_unit(state: &mut u64) -> f64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
}

fn seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
}

/// A running access link between a site's TUN device and the core's. Dropping it stops and
/// joins its threads and closes both devices.
pub(crate) struct Link {
    up: Arc<Direction>,
    down: Arc<Direction>,
    stop: Option<PipeWriter>,
    threads: Vec<JoinHandle<()>>,
}

impl Link {
    /// Starts forwarding between `site` and `core`; `up` shapes site-to-core traffic.
    pub(crate) fn start(site: Tun, core: Tun, up: Shape, down: Shape) -> io::Result<Link> {
        let (stop_rx, stop_tx) = io::pipe()?;
        let site = Arc::new(site.file);
        let core = Arc::new(core.file);
        let mut link = Link {
            up: Arc::new(Direction::new(up, seed())),
            down: Arc::new(Direction::new(down, seed())),
            stop: Some(stop_tx),
            threads: Vec::new(),
        };
        for (dir, from, to) in [(&link.up, &site, &core), (&link.down, &core, &site)] {
            let (d, f, rx) = (Arc::clone(dir), Arc::clone(from), stop_rx.try_clone()?);
            link.threads
                .push(spawn("wan-link-rx", move || read_loop(&d, &f, &rx))?);
            let (d, t) = (Arc::clone(dir), Arc::clone(to));
            link.threads
                .push(spawn("wan-link-tx", move || write_loop(&d, &t))?);
        }
        Ok(link)
    }

    /// Changes the one-way delay of both directions; packets already in flight keep theirs.
    pub(crate) fn set_delay(&self, delay: Duration) {
        lock(&self.up.shape).delay = delay;
        lock(&self.down.shape).delay = delay;
    }

    pub(crate) fn counters(&self) -> LinkCounters {
        LinkCounters {
            up: self.up.counters.snapshot(),
            down: self.down.counters.snapshot(),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        drop(self.stop.take());
        self.up.stop();
        self.down.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.to_owned()).spawn(f)
}

fn read_loop(dir: &Direction, from: &File, stop: &PipeReader) {
    let mut buf = vec![0u8; READ_BUFFER];
    while let Ok(true) = wait_readable(from, stop) {
        match (&*from).read(&mut buf) {
            Ok(n) if n > 0 => dir.admit(buf[..n].to_vec(), Instant::now()),
            Ok(_) => {}
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
}

fn write_loop(dir: &Direction, to: &File) {
    while let Some(packet) = dir.next_due() {
        // A TUN write takes a whole packet or fails; it is never partial.
        match (&*to).write(&packet) {
            Ok(n) if n == packet.len() => {
                dir.counters.packets.fetch_add(1, Ordering::Relaxed);
                dir.counters
                    .bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
            _ => {
                dir.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
