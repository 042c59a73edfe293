//! A multi-turn conversation: its messages, rendered through the model's chat
//! template for every turn. The [`super::Generator`] keeps what its session already
//! holds of the rendering, so that a new turn sends only what the conversation added.

use super::chat_template::ChatMessage;
use super::generate::Generation;
use super::ClientModel;
use crate::client::chat_template::ChatTemplateError;
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConversationError {
    #[error(transparent)]
    Template(#[from] ChatTemplateError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

#[derive(Debug, Default)]
pub struct Conversation {
    system: Option<String>,
    messages: Vec<ChatMessage>,
}

impl Conversation {
    pub fn new(system: Option<String>) -> Self {
        Self {
            system,
            ..Self::default()
        }
    }

    /// Forgets every message (the system message stays).
    pub fn reset(&mut self) {
        self.messages.clear();
    }

    /// Adds the user's message and renders the conversation, ending with the opening
    /// of the assistant's turn. On an error the message is not kept.
    pub fn ask(
        &mut self,
        model: &ClientModel,
        text: impl Into<String>,
    ) -> Result<Vec<u32>, ConversationError> {
        self.messages.push(ChatMessage::user(text));
        let rendered = self.render(model);
        let tokens = match rendered {
            Ok(tokens) => tokens,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        Ok(tokens)
    }

    /// Takes back the last question, which got no answer.
    pub fn withdraw(&mut self) {
        self.messages.pop();
    }

    /// Records the assistant's reply to the last question.
    pub fn answer(&mut self, reply: &Generation) {
        self.messages
            .push(ChatMessage::new("assistant", reply.text.clone()));
    }

    fn render(&self, model: &ClientModel) -> Result<Vec<u32>, ConversationError> {
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.extend(self.messages.iter().cloned());
        Ok(model.chat_prompt_ids(&messages)?)
    }
}
