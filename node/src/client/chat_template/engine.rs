//! The render itself, with minijinja: a budget of instructions ([`FUEL_BASE`],
//! [`FUEL_PER_MESSAGE`]) and of output bytes ([`output_limit`]), so that a template
//! that loops or writes without end fails with an error naming the template instead
//! of holding a thread (and an API slot) forever.

use std::io;

use minijinja::{context, Environment, Error, ErrorKind};

use super::{ChatMessage, ChatTemplateError, RenderRequest};

/// Instructions any render may take. Measured on the real templates of the supported
/// families (Llama 3.x, Qwen 2.5 and 3, Phi-3.5, Mistral Nemo, SmolLM 3): 54 to 143
/// instructions for a system and a user message, and 27 to 65 for each further
/// message. The budget is over a hundred times that for short conversations and
/// about forty times per message, and grows only with the messages a request brings
/// (which the API's body limit bounds): a template that loops spends it in
/// milliseconds and fails.
pub const FUEL_BASE: u64 = 20_000;
pub const FUEL_PER_MESSAGE: u64 = 2_500;

/// Bytes of output any render may write beyond what its messages bring.
const OUTPUT_BASE: usize = 1 << 20;

/// The most output a render of `messages` may write: the real templates write each
/// content once with a few dozen bytes around it; twice the contents leaves room for
/// a template that repeats the system message.
pub fn output_limit(messages: &[ChatMessage]) -> usize {
    let contents: usize = messages
        .iter()
        .map(|m| m.content.len() + m.role.len())
        .sum();
    OUTPUT_BASE.saturating_add(contents.saturating_mul(2))
}

fn fuel(messages: &[ChatMessage]) -> u64 {
    FUEL_BASE.saturating_add(FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64))
}

/// The render's output, refused past its limit.
struct CappedOutput {
    bytes: Vec<u8>,
    limit: usize,
    over: bool,
}

impl io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.limit {
            self.over = true;
            return Err(io::Error::other("the output limit is reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Renders in this process, within the instruction and output budgets.
pub fn render_here(request: &RenderRequest) -> Result<String, ChatTemplateError> {
    let messages = request.messages;
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
    let fuel = fuel(messages);
    env.set_fuel(Some(fuel));
    let mut out = CappedOutput {
        bytes: Vec::new(),
        limit: output_limit(messages),
        over: false,
    };
    let rendered = env.add_template("chat", request.template).and_then(|()| {
        env.get_template("chat")?.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => request.add_generation_prompt,
                bos_token => request.bos_token,
                eos_token => request.eos_token,
            },
            &mut out,
        )
    });
    match rendered {
        Ok(_) => String::from_utf8(out.bytes)
            .map_err(|_| ChatTemplateError::Render("its output is not UTF-8".into())),
        Err(_) if out.over => Err(ChatTemplateError::TooLong(out.limit)),
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(ChatTemplateError::OutOfFuel(fuel)),
        Err(e) => Err(ChatTemplateError::Render(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(
        template: &str,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatTemplateError> {
        render_here(&RenderRequest {
            template,
            messages,
            add_generation_prompt,
            bos_token,
            eos_token,
        })
    }

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
