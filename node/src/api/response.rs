//! What the API answers: OpenAI's chat and text-completion responses, their streamed
//! chunks and their two shapes of log-probabilities, typed.
//!
//! Fields are declared in alphabetical order: the order the API has always written
//! them in, so an answer is the same bytes whatever builds it. Log-probabilities are
//! written as f64 for the same reason (the f32 widened, not rounded to f32 digits).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::client::logprobs::TokenLogprob;
use crate::client::{FinishReason, ModelTokenizer};

/// What every response and chunk of one request carries.
#[derive(Clone)]
pub struct Header {
    id: String,
    created: u64,
    model: String,
}

impl Header {
    /// A new response's header: a random id starting with `prefix` (`chatcmpl`,
    /// `cmpl`, as OpenAI's do), made now.
    pub fn new(prefix: &str, model: &str) -> Self {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            id: format!("{prefix}-{:016x}", rand::random::<u64>()),
            created,
            model: model.to_string(),
        }
    }

    /// A response or chunk of `object` with its one choice.
    pub fn completion<C>(
        &self,
        object: &'static str,
        choice: C,
        usage: Option<Usage>,
    ) -> Completion<'_, C> {
        Completion {
            choices: [choice],
            created: self.created,
            id: &self.id,
            model: &self.model,
            object,
            usage,
        }
    }
}

/// A whole response, or one streamed chunk (`usage` only on a stream's last).
#[derive(Serialize)]
pub struct Completion<'a, C> {
    choices: [C; 1],
    created: u64,
    id: &'a str,
    model: &'a str,
    object: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
pub struct Usage {
    completion_tokens: usize,
    prompt_tokens: usize,
    total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            completion_tokens,
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A whole chat response's choice.
#[derive(Serialize)]
pub struct ChatChoice {
    finish_reason: FinishReason,
    index: u32,
    logprobs: Option<ChatLogprobs>,
    message: Message,
}

#[derive(Serialize)]
struct Message {
    content: String,
    role: &'static str,
}

impl ChatChoice {
    pub fn new(text: String, finish: FinishReason, logprobs: Option<ChatLogprobs>) -> Self {
        Self {
            finish_reason: finish,
            index: 0,
            logprobs,
            message: Message {
                content: text,
                role: "assistant",
            },
        }
    }
}

/// A streamed chat chunk's choice: what the message gained.
#[derive(Serialize)]
pub struct ChatChunkChoice {
    delta: Delta,
    finish_reason: Option<FinishReason>,
    index: u32,
    logprobs: Option<ChatLogprobs>,
}

#[derive(Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
}

impl ChatChunkChoice {
    /// A stream's first chunk: it names the speaker, and has no text yet.
    pub fn opening() -> Self {
        Self {
            delta: Delta {
                content: None,
                role: Some("assistant"),
            },
            finish_reason: None,
            index: 0,
            logprobs: None,
        }
    }

    pub fn new(
        text: Option<String>,
        finish: Option<FinishReason>,
        logprobs: Option<ChatLogprobs>,
    ) -> Self {
        Self {
            delta: Delta {
                content: text,
                role: None,
            },
            finish_reason: finish,
            index: 0,
            logprobs,
        }
    }
}

/// A text completion's choice, whole or streamed: the same shape.
#[derive(Serialize)]
pub struct TextChoice {
    finish_reason: Option<FinishReason>,
    index: u32,
    logprobs: Option<TextLogprobs>,
    text: String,
}

impl TextChoice {
    pub fn new(text: String, finish: Option<FinishReason>, logprobs: Option<TextLogprobs>) -> Self {
        Self {
            finish_reason: finish,
            index: 0,
            logprobs,
            text,
        }
    }
}

/// The chat API's shape: `{"content": [{"bytes", "logprob", "token", "top_logprobs"}]}`.
#[derive(Serialize)]
pub struct ChatLogprobs {
    content: Vec<ChatTokenLogprob>,
}

#[derive(Serialize)]
struct ChatTokenLogprob {
    #[serde(flatten)]
    token: TokenEntry,
    top_logprobs: Vec<TokenEntry>,
}

/// One token with its log-probability; an alternative is no more than this.
#[derive(Serialize)]
struct TokenEntry {
    bytes: Vec<u8>,
    logprob: f64,
    token: String,
}

impl ChatLogprobs {
    pub fn new(tokenizer: &ModelTokenizer, tokens: &[TokenLogprob]) -> Self {
        let entry = |id: u32, logprob: f32| {
            let token = tokenizer.token_piece(id);
            TokenEntry {
                bytes: token.as_bytes().to_vec(),
                logprob: logprob.into(),
                token: token.to_string(),
            }
        };
        let content = tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: entry(t.token_id, t.logprob),
                top_logprobs: t.top.iter().map(|a| entry(a.token_id, a.logprob)).collect(),
            })
            .collect();
        Self { content }
    }
}

/// The legacy completions shape: parallel lists, alternatives as text →
/// log-probability (tokens of the same text share one entry).
#[derive(Serialize)]
pub struct TextLogprobs {
    text_offset: Vec<usize>,
    token_logprobs: Vec<f64>,
    tokens: Vec<String>,
    top_logprobs: Vec<BTreeMap<String, f64>>,
}

impl TextLogprobs {
    /// The log-probabilities of `tokens`, whose text starts at `*offset` in the
    /// completion; `offset` moves past them.
    pub fn new(tokenizer: &ModelTokenizer, tokens: &[TokenLogprob], offset: &mut usize) -> Self {
        let piece = |id: u32| tokenizer.token_piece(id).to_string();
        let mut text_offset = Vec::with_capacity(tokens.len());
        let texts = tokens
            .iter()
            .map(|t| {
                let p = piece(t.token_id);
                text_offset.push(*offset);
                *offset += p.len();
                p
            })
            .collect();
        let top_logprobs = tokens
            .iter()
            .map(|t| {
                t.top
                    .iter()
                    .map(|a| (piece(a.token_id), a.logprob.into()))
                    .collect()
            })
            .collect();
        Self {
            text_offset,
            token_logprobs: tokens.iter().map(|t| t.logprob.into()).collect(),
            tokens: texts,
            top_logprobs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
        }
    }

    fn json<C: Serialize>(object: &'static str, choice: C, usage: Option<Usage>) -> String {
        serde_json::to_string(&header().completion(object, choice, usage)).unwrap()
    }

    #[test]
    fn answers_and_chunks_keep_the_apis_bytes() {
        let opening = json("chat.completion.chunk", ChatChunkChoice::opening(), None);
        assert_eq!(
            opening,
            r#"{"choices":[{"delta":{"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":7,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk"}"#
        );
        let whole = ChatChoice::new("Hi".into(), FinishReason::Length, None);
        assert_eq!(
            json("chat.completion", whole, Some(Usage::new(3, 2))),
            r#"{"choices":[{"finish_reason":"length","index":0,"logprobs":null,"message":{"content":"Hi","role":"assistant"}}],"created":7,"id":"chatcmpl-1","model":"m","object":"chat.completion","usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5}}"#
        );
        let last = ChatChunkChoice::new(None, Some(FinishReason::Stop), None);
        assert_eq!(
            json("chat.completion.chunk", last, None),
            r#"{"choices":[{"delta":{},"finish_reason":"stop","index":0,"logprobs":null}],"created":7,"id":"chatcmpl-1","model":"m","object":"chat.completion.chunk"}"#
        );
        let text = TextChoice::new(" Paris".into(), None, None);
        assert_eq!(
            json("text_completion", text, None),
            r#"{"choices":[{"finish_reason":null,"index":0,"logprobs":null,"text":" Paris"}],"created":7,"id":"chatcmpl-1","model":"m","object":"text_completion"}"#
        );
    }
}
