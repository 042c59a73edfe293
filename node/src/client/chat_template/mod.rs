//! Rendering a conversation with the model's own chat template (a Jinja template in
//! the GGUF's `tokenizer.chat_template`), as Hugging Face's tokenizers do.
//!
//! The template is code from the model file, which anyone may have written. A render
//! runs on a budget of instructions and of output bytes ([`engine`]); and since a
//! template can still build a string of any size in a few instructions (`s ~ s`,
//! `s * n`), the `allmende` binary renders in a child process with its own memory
//! and CPU limits ([`child`]), so such a template fails one request with an error
//! instead of taking the process, and every conversation it serves, with it.

mod child;
mod engine;

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

pub use child::{serve_one_render, SUBCOMMAND};
pub use engine::{output_limit, render_here, FUEL_BASE, FUEL_PER_MESSAGE};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the model has no chat template (tokenizer.chat_template); use a raw prompt instead")]
    Missing,
    #[error("the model's chat template failed: {0}")]
    Render(String),
    #[error("the model's chat template ran out of its budget of {0} instructions for this conversation (a template that loops without end, or far too long)")]
    OutOfFuel(u64),
    #[error("the model's chat template wrote more than {0} bytes for this conversation (a template that writes without end)")]
    TooLong(usize),
    #[error("message {index} has the role {role:?}; this model's chat template takes {known}")]
    Role {
        index: usize,
        role: String,
        known: &'static str,
    },
    #[error("message {0}: the model's chat template changes its content, or renders differently because of it, so that control tokens' texts in it could not be kept as text")]
    ContentNotKept(usize),
    #[error("the model's chat template renders control tokens for this conversation that it does not render around placeholders; refused, as a message's text might have become one")]
    ControlsChanged,
    #[error("the model's chat template asked for more than the {0} MiB its render may use for this conversation (a template that builds strings without end)")]
    OutOfMemory(u64),
    #[error("the model's chat template's render process failed: {0}")]
    Process(String),
    #[error(transparent)]
    Tokenizer(#[from] crate::model::ModelError),
}

/// The program renders run in, once [`render_in_child_processes`] has named it.
static CHILD_PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// From now on, every render of this process runs in a child process of `program`
/// (the `allmende` binary, which answers `render-template`). The binary does this at
/// start; a library user who does not renders in its own process, within the
/// instruction and output budgets only.
pub fn render_in_child_processes(program: PathBuf) {
    let _ = CHILD_PROGRAM.set(program);
}

/// Renders `messages` and, when `add_generation_prompt`, the opening of the
/// assistant's turn.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ChatTemplateError> {
    let request = RenderRequest {
        template,
        messages,
        add_generation_prompt,
        bos_token,
        eos_token,
    };
    match CHILD_PROGRAM.get() {
        Some(program) => child::render(program, &request),
        None => render_here(&request),
    }
}

/// One render's inputs.
#[derive(Serialize)]
pub struct RenderRequest<'a> {
    pub template: &'a str,
    pub messages: &'a [ChatMessage],
    pub add_generation_prompt: bool,
    pub bos_token: &'a str,
    pub eos_token: &'a str,
}
