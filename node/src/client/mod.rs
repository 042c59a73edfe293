//! The user's side of a generation: tokenizer, chat template, embedding, LM head and
//! sampling, all kept in the user's own process, plus the [`Generator`] every front
//! end drives, which runs a [`Pipeline`] of layers opened through a [`Backend`]:
//! local shards, or servers of the swarm found by [`routes::RouteFinder`].

pub mod backend;
pub mod chat_prompt;
pub mod chat_template;
pub mod connect;
pub mod conversation;
pub mod generate;
pub mod generator;
pub mod head;
pub mod logprobs;
pub mod pipeline;
pub mod remote;
pub mod routes;
pub mod sampling;
pub mod stream;
pub mod tokenizer;

use std::path::Path;

use crate::model::{GgufFile, ModelConfig, ModelError};

pub use backend::{Backend, LocalBackend, SwarmBackend};
pub use generate::{
    continue_session, generate, FinishReason, GenerateError, Generation, GenerationParams, Piece,
    SessionSpan, Timings,
};
pub use generator::Generator;
pub use head::ClientHead;
pub use pipeline::{LocalPipeline, Pipeline, PipelineError, RouteReport};
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
        let (bos, eos) = self.special_texts();
        chat_template::render(template, messages, true, &bos, &eos)
    }

    /// The token ids of `messages` rendered with the model's chat template, ready to
    /// complete, with every message's content read as text: control tokens' texts in
    /// it stay text ([`chat_prompt::prompt_ids`]).
    pub fn chat_prompt_ids(
        &self,
        messages: &[chat_template::ChatMessage],
    ) -> Result<Vec<u32>, chat_template::ChatTemplateError> {
        let template = self
            .tokenizer
            .chat_template()
            .ok_or(chat_template::ChatTemplateError::Missing)?;
        let (bos, eos) = self.special_texts();
        chat_prompt::prompt_ids(&self.tokenizer, template, messages, &bos, &eos)
    }

    /// The texts of BOS and EOS, as templates write them.
    fn special_texts(&self) -> (String, String) {
        let text = |id: Option<u32>| {
            id.and_then(|id| self.tokenizer.token_text(id))
                .unwrap_or_default()
        };
        (text(self.tokenizer.bos()), text(Some(self.tokenizer.eos())))
    }
}
