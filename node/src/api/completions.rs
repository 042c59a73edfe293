//! `POST /v1/completions`: a raw prompt continued, answered whole or streamed as
//! `text_completion` chunks.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::request::CompletionRequest;
use super::response::{TextChoice, TextLogprobs};
use super::run::{respond, Endpoint};
use super::{ApiError, Gateway};
use crate::client::logprobs::TokenLogprob;
use crate::client::{ClientModel, FinishReason, ModelTokenizer};

pub async fn completion(
    State(gateway): State<Arc<Gateway>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(request)) => request,
        Err(e) => return ApiError::bad_request(e.body_text()).into_response(),
    };
    match request.check() {
        Ok(logprobs) => respond::<Text>(gateway, request.prompt, logprobs, request.options).await,
        Err(e) => e.into_response(),
    }
}

struct Text;

impl Endpoint for Text {
    /// A raw prompt: control tokens' texts in it are control tokens.
    type Prompt = String;
    type Choice = TextChoice;
    type ChunkChoice = TextChoice;
    type Logprobs = TextLogprobs;
    const ID_PREFIX: &'static str = "cmpl";
    const OBJECT: &'static str = "text_completion";
    const CHUNK_OBJECT: &'static str = "text_completion";

    fn prompt_ids(model: &ClientModel, prompt: &String) -> Result<Vec<u32>, ApiError> {
        model
            .tokenizer
            .encode(prompt)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }

    fn logprobs(
        tokenizer: &ModelTokenizer,
        tokens: &[TokenLogprob],
        offset: &mut usize,
    ) -> TextLogprobs {
        TextLogprobs::new(tokenizer, tokens, offset)
    }

    fn choice(text: String, finish: FinishReason, logprobs: Option<TextLogprobs>) -> TextChoice {
        TextChoice::new(text, Some(finish), logprobs)
    }

    /// A text stream starts with its text.
    fn opening() -> Option<TextChoice> {
        None
    }

    fn chunk(
        text: Option<String>,
        finish: Option<FinishReason>,
        logprobs: Option<TextLogprobs>,
    ) -> TextChoice {
        TextChoice::new(text.unwrap_or_default(), finish, logprobs)
    }
}
