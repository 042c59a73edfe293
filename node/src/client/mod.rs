//! The user's side of a generation: tokenizer, chat template, embedding, LM head and
//! sampling, all kept in the user's own process, plus the generation loop that drives
//! a [`Pipeline`] of layers (local shards now, remote servers later).

pub mod chat_template;
pub mod connect;
pub mod conversation;
pub mod generate;
pub mod head;
pub mod logprobs;
pub mod pipeline;
pub mod remote;
pub mod sampling;
pub mod stream;
pub mod tokenizer;

use std::path::Path;

use crate::model::{GgufFile, ModelConfig, ModelError};

pub use generate::{
    continue_session, generate, FinishReason, GenerateError, Generation, GenerationParams, Piece,
    SessionSpan, Timings,
};
pub use head::ClientHead;
pub use pipeline::{LocalPipeline, Pipeline, PipelineError};
pub use remote::{HopCounts, RemotePipeline, RouteSegment};
pub use sampling::SamplingParams;
pub use tokenizer::ModelTokenizer;

/// Everything a client holds of the model: no transformer layers.
pub struct ClientModel {
    pub config: ModelConfig,
    pub head: ClientHead,
    pub tokenizer: ModelTokenizer,
}

impl ClientModel {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let mut gguf = GgufFile::open(path)?;
        Self::from_gguf(&mut gguf)
    }

    pub fn from_gguf(gguf: &mut GgufFile) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(gguf)?;
        let tokenizer = ModelTokenizer::from_gguf(gguf)?;
        let head = ClientHead::load(gguf, &config)?;
        Ok(Self {
            config,
            head,
            tokenizer,
        })
    }

    /// Renders one user message with the model's chat template, ready to complete.
    pub fn chat_prompt(
        &self,
        messages: &[chat_template::ChatMessage],
    ) -> Result<String, chat_template::ChatTemplateError> {
        let template = self
            .tokenizer
            .chat_template()
            .ok_or(chat_template::ChatTemplateError::Missing)?;
        let text = |id: Option<u32>| {
            id.and_then(|id| self.tokenizer.token_text(id))
                .unwrap_or_default()
        };
        let bos = text(self.tokenizer.bos());
        let eos = text(Some(self.tokenizer.eos()));
        chat_template::render(template, messages, true, &bos, &eos)
    }

    /// The token ids of `messages` rendered with the model's chat template, ready to
    /// complete, with control tokens' texts inside message contents read as text
    /// ([`ModelTokenizer::encode_with_literals`]).
    pub fn chat_prompt_ids(
        &self,
        messages: &[chat_template::ChatMessage],
    ) -> Result<Vec<u32>, chat_template::ChatTemplateError> {
        let text = self.chat_prompt(messages)?;
        let literal = self.content_ranges(&text, messages)?;
        Ok(self.tokenizer.encode_with_literals(&text, &literal)?)
    }

    /// Where each message's content (or, as templates often trim it, its trimmed
    /// text) lies in the rendered `text`, in order. A content the template changed
    /// otherwise cannot be located; that is refused only if it holds a control
    /// token's text, which could then not be kept from acting as one.
    fn content_ranges(
        &self,
        text: &str,
        messages: &[chat_template::ChatMessage],
    ) -> Result<Vec<std::ops::Range<usize>>, chat_template::ChatTemplateError> {
        let mut ranges = Vec::with_capacity(messages.len());
        let mut at = 0;
        for (i, m) in messages.iter().enumerate() {
            let found = [m.content.as_str(), m.content.trim()]
                .into_iter()
                .filter(|c| !c.is_empty())
                .find_map(|c| text[at..].find(c).map(|p| at + p..at + p + c.len()));
            match found {
                Some(range) => {
                    at = range.end;
                    ranges.push(range);
                }
                None if self.tokenizer.has_control_text(&m.content)? => {
                    return Err(chat_template::ChatTemplateError::Render(format!(
                        "message {i} holds a control token's text, and the template changed the message so that it cannot be kept as text"
                    )))
                }
                None => {}
            }
        }
        Ok(ranges)
    }
}
