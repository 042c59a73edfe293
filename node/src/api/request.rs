//! What clients send: OpenAI's chat and text-completion request bodies, typed, with the
//! checks each field needs. Unknown fields are accepted and ignored, as OpenAI's
//! clients send many (`n`, `user`, `frequency_penalty`, ...).

use serde::Deserialize;

use super::ApiError;
use crate::client::chat_template::ChatMessage;
use crate::client::SamplingParams;

/// Tokens generated when a request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: u32 = 256;
/// OpenAI's limits on alternatives per token.
const MAX_TOP_LOGPROBS_CHAT: u32 = 20;
const MAX_LOGPROBS_COMPLETIONS: u32 = 5;
/// OpenAI's limit on stop sequences.
const MAX_STOPS: usize = 4;
/// Longest stop sequence: the stop matcher holds back text as long as the longest.
const MAX_STOP_BYTES: usize = 256;

/// `POST /v1/chat/completions`.
#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Log-probabilities of the output tokens, with `top_logprobs` alternatives each.
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub options: Options,
}

impl ChatRequest {
    /// Refuses what no run could answer; returns the alternatives per token to report,
    /// when the request asks for log-probabilities.
    pub fn check(&self) -> Result<Option<usize>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request("`messages` must not be empty").param("messages"));
        }
        match (self.logprobs, self.top_logprobs) {
            (_, Some(k)) if k > MAX_TOP_LOGPROBS_CHAT => Err(ApiError::bad_request(format!(
                "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS_CHAT}, got {k}"
            ))
            .param("top_logprobs")),
            (false, Some(_)) => Err(ApiError::bad_request(
                "top_logprobs needs logprobs set to true",
            )
            .param("top_logprobs")),
            (true, k) => Ok(Some(k.unwrap_or(0) as usize)),
            (false, None) => Ok(None),
        }
    }
}

/// `POST /v1/completions`.
#[derive(Deserialize)]
pub struct CompletionRequest {
    /// A raw prompt: control tokens' texts in it are control tokens.
    pub prompt: String,
    /// The legacy API's form: this many alternatives (0 to 5) with each token.
    logprobs: Option<u32>,
    #[serde(flatten)]
    pub options: Options,
}

impl CompletionRequest {
    /// Like [`ChatRequest::check`].
    pub fn check(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            Some(k) if k > MAX_LOGPROBS_COMPLETIONS => Err(ApiError::bad_request(format!(
                "logprobs must be between 0 and {MAX_LOGPROBS_COMPLETIONS}, got {k}"
            ))
            .param("logprobs")),
            k => Ok(k.map(|k| k as usize)),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields both endpoints share.
#[derive(Deserialize)]
pub struct Options {
    pub model: Option<String>,
    max_tokens: Option<u32>,
    /// The chat API's newer name for `max_tokens`; wins when both are set.
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
}

impl Options {
    /// Temperature and nucleus, checked against OpenAI's ranges; a request without a
    /// seed gets a random one.
    pub fn sampling(&self) -> Result<SamplingParams, ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request(format!(
                "temperature must be between 0 and 2, got {temperature}"
            ))
            .param("temperature"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(
                ApiError::bad_request(format!("top_p must be in (0, 1], got {top_p}"))
                    .param("top_p"),
            );
        }
        Ok(SamplingParams {
            temperature,
            top_k: 0,
            top_p,
            seed: self.seed.unwrap_or_else(rand::random),
        })
    }

    /// Tokens to generate at most, if they fit after `prompt_tokens` in `context`.
    pub fn max_tokens(&self, prompt_tokens: usize, context: usize) -> Result<usize, ApiError> {
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS) as usize;
        if prompt_tokens + max_tokens > context {
            return Err(ApiError::bad_request(format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                prompt_tokens + max_tokens,
            ))
            .param("max_tokens")
            .code("context_length_exceeded"));
        }
        Ok(max_tokens)
    }

    /// The stop sequences, at most [`MAX_STOPS`] of at most [`MAX_STOP_BYTES`] each.
    pub fn stops(&mut self) -> Result<Vec<String>, ApiError> {
        let stops = match self.stop.take() {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) if v.len() <= MAX_STOPS => v,
            Some(Stop::Many(_)) => {
                return Err(ApiError::bad_request(format!(
                    "at most {MAX_STOPS} stop sequences are allowed"
                ))
                .param("stop"))
            }
        };
        if stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::bad_request(format!(
                "a stop sequence may be at most {MAX_STOP_BYTES} bytes long"
            ))
            .param("stop"));
        }
        Ok(stops)
    }
}
