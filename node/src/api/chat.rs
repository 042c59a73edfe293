//! `POST /v1/chat/completions`: chat messages rendered with the model's template,
//! answered as an assistant message, or streamed as `chat.completion.chunk`s.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::request::ChatRequest;
use super::response::{ChatChoice, ChatChunkChoice, ChatLogprobs};
use super::run::{respond, Endpoint};
use super::{ApiError, Gateway};
use crate::client::chat_template::{ChatMessage, ChatTemplateError};
use crate::client::logprobs::TokenLogprob;
use crate::client::{ClientModel, FinishReason, ModelTokenizer};

pub async fn chat(
    State(gateway): State<Arc<Gateway>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(request)) => request,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    match request.check() {
        Ok(logprobs) => respond::<Chat>(gateway, request.messages, logprobs, request.options).await,
        Err(e) => e.into_response(),
    }
}

struct Chat;

impl Endpoint for Chat {
    /// Messages whose contents are text throughout: a control token's text in them
    /// stays text.
    type Prompt = Vec<ChatMessage>;
    type Choice = ChatChoice;
    type ChunkChoice = ChatChunkChoice;
    type Logprobs = ChatLogprobs;
    const ID_PREFIX: &'static str = "chatcmpl";
    const OBJECT: &'static str = "chat.completion";
    const CHUNK_OBJECT: &'static str = "chat.completion.chunk";

    fn prompt_ids(model: &ClientModel, messages: &Self::Prompt) -> Result<Vec<u32>, ApiError> {
        model.chat_prompt_ids(messages).map_err(|e| match e {
            // This node could not run the render: not the request's fault.
            ChatTemplateError::Process(_) => ApiError::internal(e.to_string()),
            _ => ApiError::bad_request(e.to_string()).param("messages"),
        })
    }

    fn logprobs(
        tokenizer: &ModelTokenizer,
        tokens: &[TokenLogprob],
        _: &mut usize,
    ) -> ChatLogprobs {
        ChatLogprobs::new(tokenizer, tokens)
    }

    fn choice(text: String, finish: FinishReason, logprobs: Option<ChatLogprobs>) -> ChatChoice {
        ChatChoice::new(text, finish, logprobs)
    }

    fn opening() -> Option<ChatChunkChoice> {
        Some(ChatChunkChoice::opening())
    }

    fn chunk(
        text: Option<String>,
        finish: Option<FinishReason>,
        logprobs: Option<ChatLogprobs>,
    ) -> ChatChunkChoice {
        ChatChunkChoice::new(text, finish, logprobs)
    }
}
