//! `POST /v1/chat/completions` and `POST /v1/completions`, plain or streamed as
//! server-sent events in OpenAI's chunk format.

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use allmende_protocol::WireDType;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::stop::StopMatcher;
use super::{ApiError, Gateway};
use crate::client::chat_template::ChatMessage;
use crate::client::connect::{connect, RouteOptions};
use crate::client::generate::session_length;
use crate::client::logprobs::TokenLogprob;
use crate::client::{generate, FinishReason, GenerationParams, SamplingParams};

/// Tokens generated when a request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: u32 = 256;
/// Text pieces buffered between the generation and a slow SSE reader.
const STREAM_BUFFER: usize = 64;

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields both endpoints share; unknown fields are ignored, as OpenAI's clients
/// send many.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    messages: Vec<ChatMessage>,
    /// Log-probabilities of the output tokens, with `top_logprobs` alternatives each.
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    prompt: String,
    /// The legacy API's form: this many alternatives (0 to 5) with each token.
    logprobs: Option<u32>,
    #[serde(flatten)]
    common: Common,
}

/// OpenAI's limits on alternatives per token.
const MAX_TOP_LOGPROBS_CHAT: u32 = 20;
const MAX_LOGPROBS_COMPLETIONS: u32 = 5;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// What every response and chunk of one request carries.
#[derive(Clone)]
struct Header {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

/// A request ready to run: checked, tokenized, with its sampling settings.
struct Job {
    header: Header,
    prompt_ids: Vec<u32>,
    params: GenerationParams,
    stops: Vec<String>,
}

struct Outcome {
    text: String,
    /// One per generated token, when the request asked for them.
    logprobs: Option<Vec<TokenLogprob>>,
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
}

pub async fn chat(
    State(gateway): State<Arc<Gateway>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let Json(request) = match body {
        Ok(body) => body,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    if request.messages.is_empty() {
        return ApiError::bad_request("`messages` must not be empty")
            .param("messages")
            .into_response();
    }
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (_, Some(k)) if k > MAX_TOP_LOGPROBS_CHAT => {
            return ApiError::bad_request(format!(
                "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS_CHAT}, got {k}"
            ))
            .param("top_logprobs")
            .into_response()
        }
        (false, Some(_)) => {
            return ApiError::bad_request("top_logprobs needs logprobs set to true")
                .param("top_logprobs")
                .into_response()
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let prompt = Prompt::Chat(request.messages);
    respond(gateway, Kind::Chat, prompt, logprobs, request.common).await
}

pub async fn completion(
    State(gateway): State<Arc<Gateway>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(request)) => request,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    if let Some(k) = request.logprobs.filter(|&k| k > MAX_LOGPROBS_COMPLETIONS) {
        return ApiError::bad_request(format!(
            "logprobs must be between 0 and {MAX_LOGPROBS_COMPLETIONS}, got {k}"
        ))
        .param("logprobs")
        .into_response();
    }
    let logprobs = request.logprobs.map(|k| k as usize);
    respond(
        gateway,
        Kind::Text,
        Prompt::Text(request.prompt),
        logprobs,
        request.common,
    )
    .await
}

/// What a request asks to complete: a raw prompt, whose control tokens' texts are
/// control tokens, or chat messages, whose contents are text throughout.
enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

async fn respond(
    gateway: Arc<Gateway>,
    kind: Kind,
    prompt: Prompt,
    logprobs: Option<usize>,
    common: Common,
) -> Response {
    let stream = common.stream;
    // The slot first: a request waiting for one costs nothing but its body, and the
    // work of tokenizing and templating is done only for requests that will run.
    let permit = match gateway.admission.admit().await {
        Ok(permit) => permit,
        Err(e) => return e.into_response(),
    };
    // A long prompt's tokenizing and templating takes milliseconds: off the runtime.
    let preparing = {
        let gateway = gateway.clone();
        tokio::task::spawn_blocking(move || prepare(&gateway, kind, &prompt, logprobs, common))
    };
    let job = match preparing.await {
        Ok(Ok(job)) => job,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    gateway.metrics.requests.inc();
    match stream {
        false => match run(&gateway, &job, permit, None).await {
            // Log-probabilities make this answer ~21 entries per token: off the runtime.
            Ok(outcome) => {
                let building = tokio::task::spawn_blocking(move || {
                    full_response(&gateway, &job.header, &outcome)
                });
                match building.await {
                    Ok(response) => Json(response).into_response(),
                    Err(e) => ApiError::internal(e.to_string()).into_response(),
                }
            }
            Err(e) => e.into_response(),
        },
        true => stream_response(gateway, job, permit).into_response(),
    }
}

fn prepare(
    gateway: &Gateway,
    kind: Kind,
    prompt: &Prompt,
    logprobs: Option<usize>,
    common: Common,
) -> Result<Job, ApiError> {
    if let Some(model) = &common.model {
        if !gateway.serves(model) {
            return Err(ApiError::unknown_model(model));
        }
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!(
            "temperature must be between 0 and 2, got {temperature}"
        ))
        .param("temperature"));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::bad_request(format!("top_p must be in (0, 1], got {top_p}")).param("top_p"),
        );
    }
    let prompt_ids = match prompt {
        Prompt::Text(text) => gateway
            .model
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
        Prompt::Chat(messages) => gateway
            .model
            .chat_prompt_ids(messages)
            .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?,
    };
    if prompt_ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
    }
    if logprobs.is_some() {
        // Decodes the vocabulary once, here off the runtime, for every later answer.
        gateway.model.tokenizer.token_pieces();
    }
    let context = gateway.model.config.context_length;
    let max_tokens = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS) as usize;
    if prompt_ids.len() + max_tokens > context {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            prompt_ids.len() + max_tokens,
            prompt_ids.len()
        ))
        .param("max_tokens")
        .code("context_length_exceeded"));
    }
    let stops = match common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) if v.len() <= 4 => v,
        Some(Stop::Many(_)) => {
            return Err(ApiError::bad_request("at most 4 stop sequences are allowed").param("stop"))
        }
    };
    if stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_request(format!(
            "a stop sequence may be at most {MAX_STOP_BYTES} bytes long"
        ))
        .param("stop"));
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    Ok(Job {
        header: Header {
            kind,
            id: format!("{prefix}-{:016x}", rand::random::<u64>()),
            created,
            model: gateway.model_name.clone(),
        },
        prompt_ids,
        params: GenerationParams {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k: 0,
                top_p,
                seed: common.seed.unwrap_or_else(rand::random),
            },
            ignore_eos: false,
            logprobs,
        },
        stops,
    })
}

/// Longest stop sequence: the stop matcher holds back text as long as the longest.
const MAX_STOP_BYTES: usize = 256;

/// Set when the request that started a generation is gone: a client that hung up
/// before its (non-streamed) answer was ready.
struct Abandoned(Arc<AtomicBool>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs one generation through the swarm in the slot `permit` holds. Text pieces go
/// to `sink` as they come; a closed sink, or a dropped request (the client went
/// away), ends the generation at its next token.
async fn run(
    gateway: &Arc<Gateway>,
    job: &Job,
    permit: OwnedSemaphorePermit,
    sink: Option<mpsc::Sender<Streamed>>,
) -> Result<Outcome, ApiError> {
    let abandoned = Abandoned(Arc::new(AtomicBool::new(false)));
    let gone = abandoned.0.clone();
    let max_len = session_length(&gateway.model, job.prompt_ids.len(), &job.params) as u32;
    let options = RouteOptions::new(WireDType::F32, gateway.failover_patience);
    let mut pipeline = connect(&gateway.network, &gateway.target, max_len, options)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let model = gateway.model.clone();
    let (prompt_ids, params, stops) = (
        job.prompt_ids.clone(),
        job.params.clone(),
        job.stops.clone(),
    );
    let (result, pipeline) = tokio::task::spawn_blocking(move || {
        // The slot is the generation's until it ends, even if its request is gone.
        let _permit = permit;
        let mut matcher = StopMatcher::new(stops);
        let mut text = String::new();
        // Log-probabilities of tokens whose text the stop matcher still holds back:
        // they go out with that text, or with the last chunk.
        let mut pending = Vec::new();
        let emit = |piece: Streamed, text: &mut String| -> ControlFlow<()> {
            if piece.text.is_empty() && piece.logprobs.is_empty() {
                return ControlFlow::Continue(());
            }
            text.push_str(&piece.text);
            match &sink {
                Some(sink) if sink.blocking_send(piece).is_err() => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        };
        let result = generate(&model, &mut pipeline, &prompt_ids, &params, &mut |piece| {
            if gone.load(Ordering::Relaxed) {
                return ControlFlow::Break(());
            }
            pending.extend_from_slice(piece.logprobs);
            let shown = matcher.push(piece.text);
            if !shown.is_empty() {
                let logprobs = std::mem::take(&mut pending);
                emit(
                    Streamed {
                        text: shown,
                        logprobs,
                    },
                    &mut text,
                )?;
            }
            match matcher.is_stopped() {
                true => ControlFlow::Break(()),
                false => ControlFlow::Continue(()),
            }
        });
        let last = Streamed {
            text: matcher.finish(),
            logprobs: pending,
        };
        let _ = emit(last, &mut text);
        (result.map(|g| (g, text, matcher.is_stopped())), pipeline)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    gateway
        .metrics
        .failovers
        .inc_by(pipeline.failovers().len() as u64);
    pipeline.close().await;
    let (generation, text, stopped) = result.map_err(|e| ApiError::unavailable(e.to_string()))?;
    gateway
        .metrics
        .tokens_generated
        .inc_by(generation.token_ids.len() as u64);
    let finish_reason = match (stopped, generation.finish_reason) {
        (true, _) | (_, FinishReason::Stop) => "stop",
        (false, FinishReason::Length) => "length",
    };
    Ok(Outcome {
        text,
        logprobs: generation.logprobs,
        finish_reason,
        prompt_tokens: job.prompt_ids.len(),
        completion_tokens: generation.token_ids.len(),
    })
}

fn usage(outcome: &Outcome) -> Value {
    json!({
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    })
}

fn full_response(gateway: &Gateway, header: &Header, outcome: &Outcome) -> Value {
    let logprobs = outcome
        .logprobs
        .as_deref()
        .map_or(Value::Null, |l| match header.kind {
            Kind::Chat => chat_logprobs(gateway, l),
            Kind::Text => completion_logprobs(gateway, l),
        });
    let choice = match header.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": outcome.text},
            "finish_reason": outcome.finish_reason,
            "logprobs": logprobs,
        }),
        Kind::Text => json!({
            "index": 0,
            "text": outcome.text,
            "finish_reason": outcome.finish_reason,
            "logprobs": logprobs,
        }),
    };
    json!({
        "id": header.id,
        "object": if header.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": header.created,
        "model": header.model,
        "choices": [choice],
        "usage": usage(outcome),
    })
}

/// The chat API's shape: `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.
fn chat_logprobs(gateway: &Gateway, tokens: &[TokenLogprob]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = gateway.model.tokenizer.token_piece(id);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.token_id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|a| entry(a.token_id, a.logprob)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// The legacy completions shape: parallel lists, alternatives as text → log-probability.
fn completion_logprobs(gateway: &Gateway, tokens: &[TokenLogprob]) -> Value {
    completion_logprobs_from(gateway, tokens, &mut 0)
}

/// [`completion_logprobs`] for tokens whose text starts at `*offset` in the
/// completion, which moves past them.
fn completion_logprobs_from(
    gateway: &Gateway,
    tokens: &[TokenLogprob],
    offset: &mut usize,
) -> Value {
    let piece = |id: u32| gateway.model.tokenizer.token_piece(id).to_string();
    let mut text_offset = Vec::with_capacity(tokens.len());
    let texts: Vec<String> = tokens
        .iter()
        .map(|t| {
            let p = piece(t.token_id);
            text_offset.push(*offset);
            *offset += p.len();
            p
        })
        .collect();
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let map: serde_json::Map<String, Value> = t
                .top
                .iter()
                .map(|a| (piece(a.token_id), json!(a.logprob)))
                .collect();
            Value::Object(map)
        })
        .collect();
    json!({
        "tokens": texts,
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// Text released to a streamed response, with the log-probabilities of the tokens
/// it came from (when the request asked for them).
struct Streamed {
    text: String,
    logprobs: Vec<TokenLogprob>,
}

/// One streamed chunk; `finish` and `usage` only on the last.
fn chunk(header: &Header, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
    let choice = match header.kind {
        Kind::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(text) = text {
                delta["content"] = json!(text);
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
        }
        Kind::Text => {
            json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
        }
    };
    json!({
        "id": header.id,
        "object": if header.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": header.created,
        "model": header.model,
        "choices": [choice],
    })
}

fn stream_response(
    gateway: Arc<Gateway>,
    job: Job,
    permit: OwnedSemaphorePermit,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (events, receiver) = mpsc::channel::<Event>(STREAM_BUFFER);
    tokio::spawn(async move {
        let data = |value: Value| Event::default().data(value.to_string());
        let header = job.header.clone();
        if header.kind == Kind::Chat
            && events
                .send(data(chunk(&header, None, true, None)))
                .await
                .is_err()
        {
            return;
        }
        let (pieces, mut texts) = mpsc::channel::<Streamed>(STREAM_BUFFER);
        let forward = {
            let (events, header, gateway) = (events.clone(), header.clone(), gateway.clone());
            let logprobs = job.params.logprobs.is_some();
            tokio::spawn(async move {
                // Where the next token's text starts in the completion.
                let mut offset = 0;
                while let Some(piece) = texts.recv().await {
                    let text = (!piece.text.is_empty()).then_some(piece.text.as_str());
                    let mut chunk = chunk(&header, text, false, None);
                    if logprobs {
                        chunk["choices"][0]["logprobs"] = match header.kind {
                            Kind::Chat => chat_logprobs(&gateway, &piece.logprobs),
                            Kind::Text => {
                                completion_logprobs_from(&gateway, &piece.logprobs, &mut offset)
                            }
                        };
                    }
                    if events.send(data(chunk)).await.is_err() {
                        return;
                    }
                }
            })
        };
        let outcome = run(&gateway, &job, permit, Some(pieces)).await;
        let _ = forward.await;
        let last = match outcome {
            Ok(outcome) => {
                let mut last = chunk(&header, None, false, Some(outcome.finish_reason));
                last["usage"] = usage(&outcome);
                last
            }
            Err(e) => e.body(),
        };
        let _ = events.send(data(last)).await;
        let _ = events.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
