//! Rendering a conversation with the model's own chat template (a Jinja template in
//! the GGUF's `tokenizer.chat_template`), as Hugging Face's tokenizers do.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

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
    #[error(transparent)]
    Tokenizer(#[from] crate::model::ModelError),
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
    let mut env = Environment::new();
    // As Hugging Face's transformers renders chat templates (what their authors test
    // against): blocks trimmed, Python str methods (.strip(), .title()), and the
    // globals it adds.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("strftime_now", |format: String| -> Result<String, Error> {
        use std::fmt::Write;
        let mut out = String::new();
        // An invalid format is an error, not a panic: the template comes with the file.
        write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("strftime_now({format:?}): not a strftime format"),
            )
        })?;
        Ok(out)
    });
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    let render_err = |e: Error| ChatTemplateError::Render(e.to_string());
    env.add_template("chat", template).map_err(render_err)?;
    env.get_template("chat")
        .and_then(|t| {
            t.render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        })
        .map_err(render_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let out = render(CHATML, &[ChatMessage::user("Hi")], true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_bad_date_format_is_an_error() {
        let err = render("{{ strftime_now('%Q%') }}", &[], false, "", "").unwrap_err();
        assert!(err.to_string().contains("not a strftime format"), "{err}");
        let year = render("{{ strftime_now('%Y') }}", &[], false, "", "").unwrap();
        assert_eq!(year.len(), 4);
    }

    #[test]
    fn supports_python_methods_and_raise_exception() {
        let t = "{{ messages[0].content.strip() }}{% if messages|length > 1 %}{{ raise_exception('only one') }}{% endif %}";
        assert_eq!(
            render(t, &[ChatMessage::user("  x ")], false, "", "").unwrap(),
            "x"
        );
        let two = [ChatMessage::user("a"), ChatMessage::user("b")];
        let err = render(t, &two, false, "", "").unwrap_err();
        assert!(err.to_string().contains("only one"), "{err}");
    }
}
