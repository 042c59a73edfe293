//! Accepting API connections within bounds: a slow or idle client holds a
//! connection, and a connection holds a file descriptor that the swarm's sockets share.
//!
//! At most `max_connections` connections are open at once; a place is taken before a
//! connection is accepted, so further clients wait in the kernel's backlog and cost
//! this process nothing. A connection must deliver each request head within
//! [`HEAD_TIMEOUT`] (hyper's header read timeout, which also ends a keep-alive
//! connection left idle that long), and each request body within [`BODY_TIMEOUT`]
//! ([`read_body_in_time`]). Responses have no deadline: a stream of tokens lasts as
//! long as its generation.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::ApiError;

/// Connections open at once unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Longest a client may take to send a request head (or to start its next request
/// on a kept-alive connection): an honest one sends it in one packet.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request body: the largest allowed body over
/// a slow (1 Mbit/s) link, with room.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// The share of the process's file descriptors the API may hold: the rest are the
/// swarm's, the model file's and the logs'.
const FD_SHARE: u64 = 2;
/// Pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    max_connections: u32,
) -> std::io::Result<()> {
    let max = fitting(max_connections as usize);
    let places = Arc::new(Semaphore::new(max));
    loop {
        let Ok(place) = places.clone().acquire_owned().await else {
            return Ok(());
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("the API could not accept a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Replies are small and interactive (one token per SSE event).
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // A client that breaks off or times out is its own affair.
            let _ = connection.await;
            drop(place);
        });
    }
}

/// `wanted` connections, or fewer where the process may not open that many files.
fn fitting(wanted: usize) -> usize {
    match open_files_limit() {
        Some(limit) if (wanted as u64) > limit / FD_SHARE => {
            let fits = (limit / FD_SHARE).max(1) as usize;
            tracing::warn!(
                "the API takes at most {fits} connections, not {wanted}: this process may open {limit} files (raise it with `ulimit -n`)"
            );
            fits
        }
        _ => wanted,
    }
}

/// The soft limit on open files, where the system tells it (Linux).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Reads a request's body within [`BODY_TIMEOUT`] and `limit` bytes, so a client
/// that trickles it cannot hold a connection (and a handler) for long.
pub async fn read_body_in_time(limit: usize, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than {limit} bytes, or was cut off"),
            kind: "invalid_request_error",
            code: None,
            param: None,
            retry_after: None,
        }
        .into_response(),
        Err(_) => ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
            kind: "invalid_request_error",
            code: None,
            param: None,
            retry_after: None,
        }
        .into_response(),
    }
}
