//! The generation loop: prefill the prompt, then sample and feed back one token at a
//! time until a stop token, `max_tokens`, or the session's length limit.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::connect::ConnectError;
use super::logprobs::{token_logprob, TokenLogprob};
use super::sampling::{Sampler, SamplingError};
use super::stream::TextStream;
use super::PipelineError;
use super::{ClientModel, Pipeline, SamplingParams};
use crate::model::ModelError;

#[derive(Clone, Debug)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Never choose an end-of-generation token (as llama.cpp's `ignore_eos`): the
    /// generation runs to `max_tokens` or the session's length.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timings {
    /// From the start to the logits of the first new token: prompt processing.
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Single-token forward passes after the prefill, and their rate.
    pub decode_steps: usize,
    pub decode_tokens_per_s: f64,
    /// The slowest decode step: shows stalls such as a failover.
    pub max_step_ms: f64,
    pub total_ms: f64,
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids only; a final end-of-generation token is not included.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// One entry per token of `token_ids`, when `params.logprobs` asked for them.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Positions the session holds afterwards: the past ones, the prompt, then
    /// `token_ids[..timings.decode_steps]` (a last sampled token is not fed back).
    pub positions: usize,
    pub timings: Timings,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens but the model's context holds {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// No session could be opened for the generation.
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// The positions a session needs for `prompt_tokens` and `params`, within the context.
pub fn session_length(
    model: &ClientModel,
    prompt_tokens: usize,
    params: &GenerationParams,
) -> usize {
    (prompt_tokens + params.max_tokens).min(model.config.context_length)
}

/// Checks a prompt before any session is opened for it.
pub fn check_prompt(model: &ClientModel, prompt_ids: &[u32]) -> Result<(), GenerateError> {
    if prompt_ids.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let context = model.config.context_length;
    if prompt_ids.len() > context {
        return Err(GenerateError::PromptTooLong {
            tokens: prompt_ids.len(),
            context,
        });
    }
    Ok(())
}

/// What a generation hands on as it goes: printable text, and the log-probabilities
/// (when asked for) of the tokens generated since the last piece, so that each
/// token's are handed on once, with the text it completes.
pub struct Piece<'a> {
    pub text: &'a str,
    pub logprobs: &'a [TokenLogprob],
}

/// Generates from `prompt_ids` through `pipeline`, whose session must hold at least
/// [`session_length`] positions. `on_text` receives [`Piece`]s as they are produced,
/// and may end the generation early (a stop sequence, a departed listener) by
/// returning `Break`, which finishes it with [`FinishReason::Stop`].
pub fn generate(
    model: &ClientModel,
    pipeline: &mut dyn Pipeline,
    prompt_ids: &[u32],
    params: &GenerationParams,
    on_text: &mut dyn FnMut(Piece<'_>) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    check_prompt(model, prompt_ids)?;
    let session = SessionSpan {
        past: 0,
        capacity: session_length(model, prompt_ids.len(), params),
    };
    continue_session(model, pipeline, session, prompt_ids, params, on_text)
}

/// Where a generation stands in its session: a conversation's later turns continue
/// the session their earlier turns left, so that only their new tokens are computed.
#[derive(Clone, Copy, Debug)]
pub struct SessionSpan {
    /// Positions the session already holds.
    pub past: usize,
    /// Positions the session was opened for.
    pub capacity: usize,
}

impl SessionSpan {
    /// Refuses `new` positions after those held if there are none, or no room for them.
    pub fn check(&self, new: usize) -> Result<(), GenerateError> {
        if new == 0 {
            return Err(GenerateError::EmptyPrompt);
        }
        if self.past + new > self.capacity {
            return Err(GenerateError::PromptTooLong {
                tokens: self.past + new,
                context: self.capacity,
            });
        }
        Ok(())
    }
}

/// Like [`generate`], but `prompt_ids` follow the `session.past` positions the session
/// already holds. Generation ends at `max_tokens` or when the session is full.
pub fn continue_session(
    model: &ClientModel,
    pipeline: &mut dyn Pipeline,
    session: SessionSpan,
    prompt_ids: &[u32],
    params: &GenerationParams,
    on_text: &mut dyn FnMut(Piece<'_>) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    session.check(prompt_ids.len())?;
    params.sampling.validate()?;
    let max_len = session.capacity;
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut stream = TextStream::new(&model.tokenizer);

    let start = Instant::now();
    let hidden = pipeline.forward(&model.head.embed(prompt_ids)?)?;
    let mut logits = model.head.last_logits(&hidden)?;
    let prefill = start.elapsed();

    let mut ids = Vec::new();
    let mut logprobs = params.logprobs.map(|_| Vec::new());
    let mut position = session.past + prompt_ids.len();
    let mut decode_steps = 0;
    let mut streamed = 0;
    // Log-probabilities handed on so far.
    let mut reported = 0;
    let mut max_step = std::time::Duration::ZERO;
    let finish_reason = loop {
        if ids.len() >= params.max_tokens {
            break FinishReason::Length;
        }
        // Log-probabilities are the model's, before `ignore_eos` takes any token away:
        // a copy of the logits only where both apply.
        let unbiased = (params.ignore_eos && params.logprobs.is_some()).then(|| logits.clone());
        if params.ignore_eos {
            // As llama.cpp: end-of-generation tokens are never chosen.
            for &id in model.tokenizer.end_of_generation() {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let next = sampler.sample(&logits);
        if model.tokenizer.is_end_of_generation(next) {
            break FinishReason::Stop;
        }
        if let (Some(k), Some(list)) = (params.logprobs, logprobs.as_mut()) {
            list.push(token_logprob(
                unbiased.as_deref().unwrap_or(&logits),
                next,
                k,
            ));
        }
        ids.push(next);
        if let Some(text) = stream.push(next)? {
            streamed += text.len();
            let fresh = logprobs.as_deref().map_or(&[][..], |l| &l[reported..]);
            reported += fresh.len();
            if on_text(Piece {
                text: &text,
                logprobs: fresh,
            })
            .is_break()
            {
                break FinishReason::Stop;
            }
        }
        if ids.len() >= params.max_tokens || position >= max_len {
            break FinishReason::Length;
        }
        let step_start = Instant::now();
        let hidden = pipeline.forward(&model.head.embed(&[next])?)?;
        logits = model.head.last_logits(&hidden)?;
        max_step = max_step.max(step_start.elapsed());
        position += 1;
        decode_steps += 1;
    };
    let total = start.elapsed();
    let decode_secs = (total - prefill).as_secs_f64();
    let text = model.tokenizer.decode(&ids)?;
    // A trailing partial character held back by the stream is complete now.
    let rest = text.get(streamed..).unwrap_or_default();
    let fresh = logprobs.as_deref().map_or(&[][..], |l| &l[reported..]);
    if !rest.is_empty() || !fresh.is_empty() {
        let _ = on_text(Piece {
            text: rest,
            logprobs: fresh,
        });
    }
    Ok(Generation {
        token_ids: ids,
        text,
        finish_reason,
        logprobs,
        positions: position,
        timings: Timings {
            prefill_ms: prefill.as_secs_f64() * 1e3,
            prefill_tokens_per_s: prompt_ids.len() as f64 / prefill.as_secs_f64().max(1e-9),
            decode_steps,
            decode_tokens_per_s: if decode_steps > 0 {
                decode_steps as f64 / decode_secs.max(1e-9)
            } else {
                0.0
            },
            max_step_ms: max_step.as_secs_f64() * 1e3,
            total_ms: total.as_secs_f64() * 1e3,
        },
    })
}
