//! A multi-turn conversation: its messages, rendered through the model's chat
//! template for every turn, and the tokens its session already holds, so that a new
//! turn sends only what the conversation added since the last one.

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

/// What the next turn must send through the session.
#[derive(Debug, PartialEq, Eq)]
pub struct Turn {
    /// The whole rendered conversation, ending with the opening of the assistant's turn.
    pub tokens: Vec<u32>,
    /// How many of `tokens` the session already holds; 0 when it must start afresh.
    pub held: usize,
}

#[derive(Debug, Default)]
pub struct Conversation {
    system: Option<String>,
    messages: Vec<ChatMessage>,
    /// The tokens the session holds, in order.
    session: Vec<u32>,
}

impl Conversation {
    pub fn new(system: Option<String>) -> Self {
        Self {
            system,
            ..Self::default()
        }
    }

    /// Forgets every message (the system message stays) and the session's tokens.
    pub fn reset(&mut self) {
        self.messages.clear();
        self.session.clear();
    }

    /// Forgets what the session holds: a new session will be prefilled from scratch.
    pub fn forget_session(&mut self) {
        self.session.clear();
    }

    /// Adds the user's message and renders the conversation for the assistant's reply.
    /// On an error the message is not kept.
    pub fn ask(
        &mut self,
        model: &ClientModel,
        text: impl Into<String>,
    ) -> Result<Turn, ConversationError> {
        self.messages.push(ChatMessage::user(text));
        let rendered = self.render(model);
        let tokens = match rendered {
            Ok(tokens) => tokens,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        let held = held_prefix(&self.session, &tokens);
        Ok(Turn { tokens, held })
    }

    /// Takes back the last question, which got no answer.
    pub fn withdraw(&mut self) {
        self.messages.pop();
    }

    /// Records the assistant's reply to `turn`; the session now holds the turn's
    /// tokens and the reply's tokens that were fed back.
    pub fn answer(&mut self, turn: Turn, reply: &Generation) {
        let fed = reply.timings.decode_steps.min(reply.token_ids.len());
        self.session = turn.tokens;
        self.session.extend_from_slice(&reply.token_ids[..fed]);
        self.messages
            .push(ChatMessage::new("assistant", reply.text.clone()));
    }

    pub fn session_len(&self) -> usize {
        self.session.len()
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

/// How much of a session holding `session` can be kept for `next`: all of it when it
/// is a prefix of `next`, else nothing, since a session cannot be rewound (a chat
/// template that renders earlier turns differently once later ones exist, or a reply
/// whose text tokenizes differently from the ids that were sampled).
pub fn held_prefix(session: &[u32], next: &[u32]) -> usize {
    match next.starts_with(session) && session.len() < next.len() {
        true => session.len(),
        false => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_session_that_the_next_turn_extends() {
        assert_eq!(held_prefix(&[], &[1, 2, 3]), 0);
        assert_eq!(held_prefix(&[1, 2], &[1, 2, 3]), 2);
    }

    #[test]
    fn starts_afresh_when_the_history_changed() {
        assert_eq!(held_prefix(&[1, 2, 4], &[1, 2, 3, 5]), 0);
        // Nothing new to send would leave no logits to sample from.
        assert_eq!(held_prefix(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(held_prefix(&[1, 2, 3, 4], &[1, 2, 3]), 0);
    }
}
