//! The HTTP side of a node: an OpenAI-compatible API (`/v1/models`,
//! `/v1/chat/completions`, `/v1/completions`), a web page with a chat and a live map
//! of the swarm (`/`, fed by `/api/swarm`), and Prometheus metrics (`/metrics`).
//!
//! The gateway holds the tokenizer, embedding and LM head like any client, so prompts
//! and text stay on the machine that runs it; servers see only hidden states.

mod admission;
mod chat;
mod completions;
mod error;
mod generation;
mod listener;
mod request;
mod response;
mod run;
mod stop;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::Mutex;

pub use error::ApiError;
pub use listener::DEFAULT_MAX_CONNECTIONS;

use crate::client::connect::ModelTarget;
use crate::client::ClientModel;
use crate::metrics::Metrics;
use crate::network::discovery::discover;
use crate::network::report::swarm_report;
use crate::network::Network;

/// The swarm map is refreshed by every open page every few seconds; probing the swarm
/// once per this interval is plenty.
const SWARM_CACHE: Duration = Duration::from_secs(2);
/// Largest request body: a whole context of text in any script, with room for JSON's
/// escapes.
const BODY_LIMIT: usize = 4 << 20;

const INDEX_HTML: &str = include_str!("web/index.html");

pub struct Gateway {
    pub model: Arc<ClientModel>,
    pub target: ModelTarget,
    /// The id clients use for the model in requests (the GGUF file's stem).
    pub model_name: String,
    pub network: Network,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    pub failover_patience: Duration,
    /// Generations running at once, and the requests waiting for them.
    admission: admission::Admission,
    swarm_cache: Mutex<Option<(Instant, Value)>>,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Arc<ClientModel>,
        target: ModelTarget,
        model_name: String,
        network: Network,
        metrics: Arc<Metrics>,
        api_key: Option<String>,
        max_concurrent: usize,
        failover_patience: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            model,
            target,
            model_name,
            network,
            metrics,
            api_key,
            failover_patience,
            admission: admission::Admission::new(max_concurrent),
            swarm_cache: Mutex::new(None),
        })
    }

    /// Whether `requested` names the model served here (its name or its id).
    fn serves(&self, requested: &str) -> bool {
        requested == self.model_name || requested == self.target.id.to_hex()
    }

    async fn swarm(&self) -> Value {
        let mut cache = self.swarm_cache.lock().await;
        if let Some((at, value)) = cache.as_ref() {
            if at.elapsed() < SWARM_CACHE {
                return value.clone();
            }
        }
        let servers = discover(&self.network, &self.target.id, true).await;
        let report = swarm_report(
            &self.target.id,
            &self.target.name,
            Some(self.target.block_count),
            &servers,
        );
        let mut value = report.json;
        value["model_id"] = json!(self.model_name);
        *cache = Some((Instant::now(), value.clone()));
        value
    }
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat::chat))
        .route("/v1/completions", post(completions::completion))
        .route_layer(middleware::from_fn_with_state(gateway.clone(), require_key));
    Router::new()
        .route("/", get(index))
        .route("/api/swarm", get(swarm))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(|request: Request, next: Next| {
            listener::read_body_in_time(BODY_LIMIT, request, next)
        }))
        .with_state(gateway)
}

/// Serves the API on `listener`, at most `max_connections` at once, until the
/// process ends.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    max_connections: u32,
) -> std::io::Result<()> {
    listener::serve(listener, router(gateway), max_connections).await
}

/// Binds the API address; refuses with a clear message when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for the API on {addr}: {e}"))
}

async fn require_key(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = &gateway.api_key else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), key.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::unauthorized("Incorrect API key provided").into_response(),
        None => ApiError::unauthorized("Missing API key: send it as `Authorization: Bearer KEY`")
            .into_response(),
    }
}

/// Compares secrets without leaking, through timing, how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn swarm(State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    Json(gateway.swarm().await)
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    (
        [(header::CONTENT_TYPE, content_type)],
        gateway.metrics.encode(),
    )
}

async fn models(State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": gateway.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "allmende",
        }],
    }))
}

async fn not_found() -> ApiError {
    ApiError {
        status: axum::http::StatusCode::NOT_FOUND,
        message: "Unknown path; the API lives under /v1".into(),
        kind: "invalid_request_error",
        code: None,
        param: None,
        retry_after: None,
    }
}
