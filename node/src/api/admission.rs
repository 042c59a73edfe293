//! Which API requests run now, which wait, and which are turned away: at most the
//! configured number of generations run at once; further requests wait their turn in
//! a bounded queue for a while, as OpenAI's clients expect of a busy server, and only
//! a full queue or a wait past its deadline is refused, with 503 and `Retry-After`
//! before any response (or stream) has begun.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;

/// Longest a request waits for a generation slot.
pub const QUEUE_PATIENCE: Duration = Duration::from_secs(60);
/// Requests that may wait, per generation slot.
const WAITING_PER_SLOT: usize = 16;
/// What a refused client is told to wait before trying again.
pub const RETRY_AFTER_SECS: u64 = 5;

pub struct Admission {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    patience: Duration,
}

/// One place in the queue, given back however the wait ends.
struct Place<'a>(&'a AtomicUsize);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(max_running: usize) -> Self {
        Self::with_patience(max_running, QUEUE_PATIENCE)
    }

    fn with_patience(max_running: usize, patience: Duration) -> Self {
        let max_running = max_running.max(1);
        Self {
            running: Arc::new(Semaphore::new(max_running)),
            waiting: AtomicUsize::new(0),
            max_waiting: max_running * WAITING_PER_SLOT,
            patience,
        }
    }

    /// A slot to run one generation in, held until the permit is dropped.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(busy("too many requests are waiting"));
        }
        let _place = Place(&self.waiting);
        match tokio::time::timeout(self.patience, self.running.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(busy("no generation slot came free in time")),
        }
    }
}

fn busy(why: &str) -> ApiError {
    ApiError::unavailable(format!(
        "this gateway is at its limit ({why}); retry in {RETRY_AFTER_SECS} s"
    ))
    .retry_after(RETRY_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_wait_their_turn_and_a_full_queue_is_refused() {
        let admission = Arc::new(Admission::with_patience(1, Duration::from_millis(300)));
        let first = admission.admit().await.unwrap();
        let waiters: Vec<_> = (0..WAITING_PER_SLOT)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.admit().await.map(drop) })
            })
            .collect();
        while admission.waiting.load(Ordering::Relaxed) < WAITING_PER_SLOT {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let refused = admission.admit().await.unwrap_err();
        assert_eq!(refused.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        drop(first);
        for waiter in waiters {
            assert!(waiter.await.unwrap().is_ok(), "every waiter ran in turn");
        }
        let held = admission.admit().await.unwrap();
        let late = admission.admit().await;
        assert!(late.is_err(), "a wait past the deadline is refused");
        drop(held);
    }
}
