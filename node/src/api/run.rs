//! The one run both completion endpoints share: a generation slot, the prompt checked
//! and tokenized, the generation with its stop sequences and finish reason, answered
//! whole or streamed as server-sent events in OpenAI's chunk format. What differs
//! between chat and text completion is an [`Endpoint`].

use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::generation::{generate_through_swarm, Listener};
use super::request::Options;
use super::response::{Header, Usage};
use super::stop::StopMatcher;
use super::{ApiError, Gateway};
use crate::client::logprobs::TokenLogprob;
use crate::client::{
    ClientModel, FinishReason, Generation, GenerationParams, ModelTokenizer, Piece,
};

/// Text pieces buffered between the generation and a slow SSE reader.
const STREAM_BUFFER: usize = 64;

/// What differs between `/v1/chat/completions` and `/v1/completions`: how a prompt
/// becomes tokens, and the shapes of answers, chunks and log-probabilities.
pub trait Endpoint: 'static {
    /// What a request asks to complete.
    type Prompt: Send + 'static;
    type Choice: Serialize;
    type ChunkChoice: Serialize;
    type Logprobs: Serialize;
    /// How response ids start, as OpenAI's do.
    const ID_PREFIX: &'static str;
    const OBJECT: &'static str;
    const CHUNK_OBJECT: &'static str;

    fn prompt_ids(model: &ClientModel, prompt: &Self::Prompt) -> Result<Vec<u32>, ApiError>;
    /// The log-probabilities of `tokens`, whose text starts at `*offset` in the
    /// completion; `offset` moves past them.
    fn logprobs(
        tokenizer: &ModelTokenizer,
        tokens: &[TokenLogprob],
        offset: &mut usize,
    ) -> Self::Logprobs;
    fn choice(text: String, finish: FinishReason, logprobs: Option<Self::Logprobs>)
        -> Self::Choice;
    /// A stream's first chunk, before any text, if this shape has one.
    fn opening() -> Option<Self::ChunkChoice>;
    fn chunk(
        text: Option<String>,
        finish: Option<FinishReason>,
        logprobs: Option<Self::Logprobs>,
    ) -> Self::ChunkChoice;
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
    finish: FinishReason,
    usage: Usage,
}

/// Answers a checked request for `prompt`, with `logprobs` alternatives per token
/// when it asked for log-probabilities.
pub async fn respond<E: Endpoint>(
    gateway: Arc<Gateway>,
    prompt: E::Prompt,
    logprobs: Option<usize>,
    options: Options,
) -> Response {
    let stream = options.stream;
    // The slot first: a request waiting for one costs nothing but its body, and the
    // work of tokenizing and templating is done only for requests that will run.
    let permit = match gateway.admission.admit().await {
        Ok(permit) => permit,
        Err(e) => return e.into_response(),
    };
    // A long prompt's tokenizing and templating takes milliseconds: off the runtime.
    let preparing = {
        let gateway = gateway.clone();
        tokio::task::spawn_blocking(move || prepare::<E>(&gateway, &prompt, logprobs, options))
    };
    let job = match preparing.await {
        Ok(Ok(job)) => job,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    gateway.metrics.requests.inc();
    match stream {
        false => whole::<E>(gateway, job, permit).await,
        true => stream_response::<E>(gateway, job, permit).into_response(),
    }
}

fn prepare<E: Endpoint>(
    gateway: &Gateway,
    prompt: &E::Prompt,
    logprobs: Option<usize>,
    mut options: Options,
) -> Result<Job, ApiError> {
    if let Some(model) = &options.model {
        if !gateway.serves(model) {
            return Err(ApiError::unknown_model(model));
        }
    }
    let sampling = options.sampling()?;
    let prompt_ids = E::prompt_ids(&gateway.model, prompt)?;
    if prompt_ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
    }
    if logprobs.is_some() {
        // Decodes the vocabulary once, here off the runtime, for every later answer.
        gateway.model.tokenizer.token_pieces();
    }
    let max_tokens = options.max_tokens(prompt_ids.len(), gateway.model.config.context_length)?;
    Ok(Job {
        header: Header::new(E::ID_PREFIX, &gateway.model_name),
        prompt_ids,
        params: GenerationParams {
            max_tokens,
            sampling,
            ignore_eos: false,
            logprobs,
        },
        stops: options.stops()?,
    })
}

async fn whole<E: Endpoint>(
    gateway: Arc<Gateway>,
    job: Job,
    permit: OwnedSemaphorePermit,
) -> Response {
    let outcome = match run(&gateway, &job, permit, None).await {
        Ok(outcome) => outcome,
        Err(e) => return e.into_response(),
    };
    // Log-probabilities make this answer ~21 entries per token: off the runtime.
    let building = tokio::task::spawn_blocking(move || {
        let tokenizer = &gateway.model.tokenizer;
        let logprobs = outcome.logprobs.map(|l| E::logprobs(tokenizer, &l, &mut 0));
        let choice = E::choice(outcome.text, outcome.finish, logprobs);
        Json(
            job.header
                .completion(E::OBJECT, choice, Some(outcome.usage)),
        )
        .into_response()
    });
    building
        .await
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

/// Set when the request that started a generation is gone: a client that hung up
/// before its (non-streamed) answer was ready.
struct Abandoned(Arc<AtomicBool>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Text released to a streamed response, with the log-probabilities of the tokens
/// it came from (when the request asked for them).
struct Streamed {
    text: String,
    logprobs: Vec<TokenLogprob>,
}

/// A generation's text on its way to the request: held back by the stop matcher
/// while it may begin a stop sequence, then sent to the stream, if any.
struct Delivery {
    matcher: StopMatcher,
    /// Everything released so far: the whole answer's text.
    text: String,
    /// Log-probabilities of tokens whose text the stop matcher still holds back:
    /// they go out with that text, or with the last chunk.
    pending: Vec<TokenLogprob>,
    sink: Option<mpsc::Sender<Streamed>>,
    gone: Arc<AtomicBool>,
    /// The slot is the generation's until it ends, even if its request is gone.
    _permit: OwnedSemaphorePermit,
}

impl Delivery {
    fn emit(&mut self, piece: Streamed) -> ControlFlow<()> {
        if piece.text.is_empty() && piece.logprobs.is_empty() {
            return ControlFlow::Continue(());
        }
        self.text.push_str(&piece.text);
        match &self.sink {
            Some(sink) if sink.blocking_send(piece).is_err() => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }
}

impl Listener for Delivery {
    /// The generation, the text released, and whether a stop sequence ended it.
    type Output = (Generation, String, bool);

    fn piece(&mut self, piece: Piece<'_>) -> ControlFlow<()> {
        if self.gone.load(Ordering::Relaxed) {
            return ControlFlow::Break(());
        }
        self.pending.extend_from_slice(piece.logprobs);
        let shown = self.matcher.push(piece.text);
        if !shown.is_empty() {
            let logprobs = std::mem::take(&mut self.pending);
            self.emit(Streamed {
                text: shown,
                logprobs,
            })?;
        }
        match self.matcher.is_stopped() {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    }

    fn end(mut self, generation: Result<Generation, ApiError>) -> Result<Self::Output, ApiError> {
        let last = Streamed {
            text: self.matcher.finish(),
            logprobs: std::mem::take(&mut self.pending),
        };
        let _ = self.emit(last);
        Ok((generation?, self.text, self.matcher.is_stopped()))
    }
}

/// Runs one generation in the slot `permit` holds. Text pieces go to `sink` as they
/// come; a closed sink, or a dropped request (the client went away), ends the
/// generation at its next token.
async fn run(
    gateway: &Gateway,
    job: &Job,
    permit: OwnedSemaphorePermit,
    sink: Option<mpsc::Sender<Streamed>>,
) -> Result<Outcome, ApiError> {
    let abandoned = Abandoned(Arc::new(AtomicBool::new(false)));
    let delivery = Delivery {
        matcher: StopMatcher::new(job.stops.clone()),
        text: String::new(),
        pending: Vec::new(),
        sink,
        gone: abandoned.0.clone(),
        _permit: permit,
    };
    let (prompt_ids, params) = (job.prompt_ids.clone(), job.params.clone());
    let (generation, text, stopped) =
        generate_through_swarm(gateway, prompt_ids, params, delivery).await?;
    gateway
        .metrics
        .tokens_generated
        .inc_by(generation.token_ids.len() as u64);
    Ok(Outcome {
        text,
        logprobs: generation.logprobs,
        finish: match stopped {
            true => FinishReason::Stop,
            false => generation.finish_reason,
        },
        usage: Usage::new(job.prompt_ids.len(), generation.token_ids.len()),
    })
}

/// One server-sent event of JSON.
fn event(data: &impl Serialize) -> Event {
    Event::default().json_data(data).unwrap_or_else(|e| {
        Event::default().data(ApiError::internal(e.to_string()).body().to_string())
    })
}

fn stream_response<E: Endpoint>(
    gateway: Arc<Gateway>,
    job: Job,
    permit: OwnedSemaphorePermit,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (events, receiver) = mpsc::channel::<Event>(STREAM_BUFFER);
    tokio::spawn(async move {
        let header = job.header.clone();
        // Choices become events before each await: the stream's task holds no choice
        // across one, so an endpoint's types need not be `Send`.
        let opening = E::opening().map(|c| event(&header.completion(E::CHUNK_OBJECT, c, None)));
        if let Some(opening) = opening {
            if events.send(opening).await.is_err() {
                return;
            }
        }
        let (pieces, texts) = mpsc::channel::<Streamed>(STREAM_BUFFER);
        let logprobs = job.params.logprobs.is_some();
        let forward = tokio::spawn(forward::<E>(
            texts,
            events.clone(),
            header.clone(),
            gateway.clone(),
            logprobs,
        ));
        let outcome = run(&gateway, &job, permit, Some(pieces)).await;
        let _ = forward.await;
        let last = match outcome {
            Ok(outcome) => {
                let choice = E::chunk(None, Some(outcome.finish), None);
                event(&header.completion(E::CHUNK_OBJECT, choice, Some(outcome.usage)))
            }
            Err(e) => event(&e.body()),
        };
        let _ = events.send(last).await;
        let _ = events.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Sends each piece of text as a chunk, with its tokens' log-probabilities when the
/// request asked for them.
async fn forward<E: Endpoint>(
    mut texts: mpsc::Receiver<Streamed>,
    events: mpsc::Sender<Event>,
    header: Header,
    gateway: Arc<Gateway>,
    logprobs: bool,
) {
    // Where the next token's text starts in the completion.
    let mut offset = 0;
    while let Some(piece) = texts.recv().await {
        let logprobs =
            logprobs.then(|| E::logprobs(&gateway.model.tokenizer, &piece.logprobs, &mut offset));
        let text = (!piece.text.is_empty()).then_some(piece.text);
        let chunk =
            event(&header.completion(E::CHUNK_OBJECT, E::chunk(text, None, logprobs), None));
        if events.send(chunk).await.is_err() {
            return;
        }
    }
}
