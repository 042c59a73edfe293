//! A directory served over HTTP with byte ranges (as a model hub serves files), counting
//! the bytes of every response body it sends.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::services::ServeDir;

pub struct FileServer {
    pub addr: SocketAddr,
    sent: Arc<AtomicU64>,
    _thread: std::thread::JoinHandle<()>,
}

impl FileServer {
    /// Serves `dir` on a loopback port until the test process ends.
    pub fn start(dir: &Path) -> FileServer {
        let sent = Arc::new(AtomicU64::new(0));
        let counted = sent.clone();
        let dir = dir.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let count = move |request: Request, next: Next| {
                    let counted = counted.clone();
                    async move {
                        let response: Response = next.run(request).await;
                        let len = response
                            .headers()
                            .get("content-length")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0);
                        counted.fetch_add(len, Ordering::Relaxed);
                        response
                    }
                };
                let app = axum::Router::new()
                    .fallback_service(ServeDir::new(dir))
                    .layer(middleware::from_fn(count));
                axum::serve(listener, app).await.unwrap();
            });
        });
        FileServer {
            addr: rx.recv().unwrap(),
            sent,
            _thread: thread,
        }
    }

    /// Bytes of response bodies sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}
