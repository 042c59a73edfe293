//! A chat template is code from the model file: one that loops, writes or allocates
//! without end fails with an error naming the template, in bounded time and memory,
//! instead of holding a thread (and with it an API slot) forever, or taking the
//! process down.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use allmende_node::client::chat_template::{render, ChatMessage, ChatTemplateError};
use serde_json::json;
use support::cgroup::MemoryCage;
use support::http::{free_port, request, wait_until_serving};
use support::swarm::Node;

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

/// Builds strings without end when a message says `grow` (`s ~ s` doubles a string in
/// one instruction, out of reach of the instruction budget); ChatML otherwise.
const GROWING: &str = "{% for message in messages %}{% if message['content'] == 'grow' %}{% set ns = namespace(s='0123456789abcdef') %}{% for i in range(48) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A copy of the test model whose chat template is `template`.
fn with_template(template: &str, out: &Path) {
    let python = std::env::var("ALLMENDE_TEST_PYTHON").expect(
        "ALLMENDE_TEST_PYTHON is not set: the Python with the gguf package (scripts/test.sh sets it)",
    );
    let made = Command::new(python)
        .args([
            "-m",
            "gguf.scripts.gguf_new_metadata",
            "--force",
            "--chat-template",
        ])
        .arg(template)
        .arg(support::model_path())
        .arg(out)
        .output()
        .expect("python runs");
    assert!(
        made.status.success(),
        "gguf_new_metadata failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// A template that allocates without end fails the request that set it off, with an
/// error naming the template, while the node (in a memory group, as a gateway on a
/// small machine would be) keeps its memory and answers the next request.
#[test]
fn a_template_that_builds_strings_without_end_fails_its_request_alone() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = dir.path().join("growing-template.gguf");
    with_template(GROWING, &hostile);
    let cage = MemoryCage::new(2 << 30);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _node = Node::start_caged(
        &cage,
        "0..30",
        &[
            "--model",
            hostile.to_str().unwrap(),
            "--api",
            &addr.to_string(),
        ],
    );
    wait_until_serving(addr);
    let chat = |content: &str| json!({"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0});

    let started = Instant::now();
    let (status, body) = request(addr, "POST", "/v1/chat/completions", Some(&chat("grow")));
    let took = started.elapsed();
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("chat template") && message.contains("MiB"),
        "{message}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");

    let (status, body) = request(addr, "POST", "/v1/chat/completions", Some(&chat("Hello!")));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2, "{body}");
    assert_eq!(cage.oom_kills(), 0, "the node's group ran out of memory");
}
