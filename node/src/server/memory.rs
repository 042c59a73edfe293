//! Giving freed session memory back to the operating system.
//!
//! KV caches are large, short-lived allocations. glibc's allocator keeps freed memory
//! in its arenas (and, after the first large free, stops using fresh mappings for
//! blocks of that size), so without a nudge a node that served many sessions keeps
//! their memory resident. `malloc_trim` returns the free pages of every arena.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set when a session ended since the last trim.
static PENDING: AtomicBool = AtomicBool::new(false);
/// Set while a trim runs: one at a time.
static TRIMMING: AtomicBool = AtomicBool::new(false);

/// Notes that a session's memory was freed.
pub fn session_ended() {
    PENDING.store(true, Ordering::Relaxed);
}

/// Returns freed memory to the system if any session ended since the last call, on a
/// blocking thread: a trim walks the whole heap, which must not stall the network's
/// runtime.
pub fn trim_if_needed() {
    if TRIMMING.load(Ordering::Acquire) || !PENDING.swap(false, Ordering::Relaxed) {
        return;
    }
    TRIMMING.store(true, Ordering::Release);
    tokio::task::spawn_blocking(|| {
        trim();
        TRIMMING.store(false, Ordering::Release);
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
