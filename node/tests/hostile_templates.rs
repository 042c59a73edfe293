//! A chat template is code from the model file: one that loops or writes without end
//! fails with an error naming the template, in bounded time and memory, instead of
//! holding a thread (and with it an API slot) forever.

use std::time::{Duration, Instant};

use allmende_node::client::chat_template::{render, ChatMessage, ChatTemplateError};

fn rendered(template: &str) -> (Result<String, ChatTemplateError>, Duration) {
    let started = Instant::now();
    let messages = [ChatMessage::user("Hello!")];
    (render(template, &messages, true, "", ""), started.elapsed())
}

#[test]
fn a_template_that_loops_runs_out_of_fuel() {
    let looping =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let (result, took) = rendered(looping);
    let err = result.unwrap_err();
    assert!(matches!(err, ChatTemplateError::OutOfFuel(_)), "{err}");
    assert!(err.to_string().contains("chat template"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_template_whose_output_is_huge_is_cut_off() {
    let huge = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}";
    let (result, took) = rendered(huge);
    let err = result.unwrap_err();
    assert!(matches!(err, ChatTemplateError::TooLong(_)), "{err}");
    assert!(err.to_string().contains("chat template"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// The budgets are per message: a long honest conversation still renders.
#[test]
fn long_honest_conversations_render() {
    let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let messages: Vec<ChatMessage> = (0..20_000)
        .map(|i| ChatMessage::user("x".repeat(i % 200)))
        .collect();
    assert!(render(chatml, &messages, true, "", "").is_ok());
}
