//! The one generator every front end drives (`generate`, `chat`, the API, the
//! benchmarks): it opens a session through a [`Backend`] when it needs one, keeps it
//! while later generations continue what it holds, and closes it. Front ends only
//! say what to complete and what to do with each piece of text.
//!
//! Its methods block: an async front end runs it on a blocking thread and hands the
//! pieces over a channel; a callback returning `Break` (a stop sequence found, a
//! listener gone) ends a generation at its next token.

use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::Tensor;

use super::backend::Backend;
use super::generate::{continue_session, GenerateError, Generation, Piece, SessionSpan};
use super::pipeline::{Pipeline, RouteReport};
use super::{ClientModel, GenerationParams};

pub struct Generator {
    model: Arc<ClientModel>,
    backend: Arc<dyn Backend>,
    /// Positions each session is opened for.
    capacity: usize,
    session: Option<Box<dyn Pipeline>>,
    /// The token ids the open session holds, in order.
    held: Vec<u32>,
    /// Where the layers of a session closed after an error ran, until [`Self::close`]
    /// reports it: its failovers count too.
    failed: Option<RouteReport>,
}

impl Generator {
    pub fn new(model: Arc<ClientModel>, backend: Arc<dyn Backend>, capacity: usize) -> Self {
        Self {
            model,
            backend,
            capacity,
            session: None,
            held: Vec::new(),
            failed: None,
        }
    }

    pub fn model(&self) -> &ClientModel {
        &self.model
    }

    /// Positions each session is opened for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many of `context`'s tokens the open session holds and would keep.
    pub fn kept_of(&self, context: &[u32]) -> usize {
        held_prefix(&self.held, context)
    }

    /// Opens the session now rather than at the first step (a benchmark opens all
    /// its sessions before any starts).
    pub fn open(&mut self) -> Result<&mut dyn Pipeline, GenerateError> {
        let session = match self.session.take() {
            Some(session) => session,
            None => self.backend.open(self.capacity)?,
        };
        Ok(self.session.insert(session).as_mut())
    }

    /// Generates what follows `context`, the whole text so far as token ids. What the
    /// open session holds of it is kept and only the rest is sent; a session that
    /// holds anything else is closed and a new one opened. After an error the
    /// session is closed: its state is unknown.
    pub fn generate(
        &mut self,
        context: &[u32],
        params: &GenerationParams,
        on_text: &mut dyn FnMut(Piece<'_>) -> ControlFlow<()>,
    ) -> Result<Generation, GenerateError> {
        // Checked before any session is opened for it.
        let whole = SessionSpan {
            past: 0,
            capacity: self.capacity,
        };
        whole.check(context.len())?;
        // A session cannot be rewound: one holding anything but a prefix starts over.
        let past = held_prefix(&self.held, context);
        if past < self.held.len() {
            self.close();
        }
        let span = SessionSpan {
            past,
            capacity: self.capacity,
        };
        let model = self.model.clone();
        let result = self.open().and_then(|session| {
            continue_session(&model, session, span, &context[past..], params, on_text)
        });
        match &result {
            Ok(reply) => {
                // The last sampled token was not fed back, unless decoding went on.
                let fed = reply.timings.decode_steps.min(reply.token_ids.len());
                self.held = context.to_vec();
                self.held.extend_from_slice(&reply.token_ids[..fed]);
            }
            Err(_) => {
                self.failed = self.close();
            }
        }
        result
    }

    /// Runs `ids` through the session at its next positions without sampling, and
    /// returns the final hidden states: teacher forcing, as the load benchmark does.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Tensor, GenerateError> {
        if self.held.len() + ids.len() > self.capacity {
            return Err(GenerateError::PromptTooLong {
                tokens: self.held.len() + ids.len(),
                context: self.capacity,
            });
        }
        let hidden = self.model.head.embed(ids)?;
        let output = self.open()?.forward(&hidden)?;
        self.held.extend_from_slice(ids);
        Ok(output)
    }

    /// Closes the session, if one is open, and reports where its layers ran (or those
    /// of the last session an error closed).
    pub fn close(&mut self) -> Option<RouteReport> {
        self.held.clear();
        let Some(mut session) = self.session.take() else {
            return self.failed.take();
        };
        let report = session.report();
        session.close();
        Some(report)
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
