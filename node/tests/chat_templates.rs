//! Chat templates render exactly as Hugging Face's transformers renders them (Python
//! jinja2 with transformers' settings and globals): the real templates of the
//! supported families from llama.cpp's `models/templates/`, and the test model's own,
//! on conversations with and without a system message. The Python side runs in the
//! test environment's interpreter, `ALLMENDE_TEST_PYTHON` (`scripts/test.sh` sets
//! it); the templates come from `ALLMENDE_LLAMA_CPP_DIR`.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use allmende_node::client::chat_template::{render, ChatMessage};
use allmende_node::model::GgufFile;
use serde_json::{json, Value};

const TEMPLATES: &[&str] = &[
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct",
    "Qwen-Qwen2.5-7B-Instruct",
    "Qwen-Qwen3-0.6B",
    "microsoft-Phi-3.5-mini-instruct",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "HuggingFaceTB-SmolLM3-3B",
];

/// transformers' `_compile_jinja_template`: the same environment, filters and globals.
const JINJA2: &str = r#"
import json, sys
from datetime import datetime
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)
def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = lambda f: datetime.now().strftime(f)
out = []
for case in json.load(sys.stdin):
    try:
        t = env.from_string(case["template"])
        out.append({"ok": t.render(messages=case["messages"], add_generation_prompt=True,
                                   bos_token=case["bos"], eos_token=case["eos"])})
    except Exception as e:
        out.append({"err": str(e)})
print(json.dumps(out))
"#;

fn conversations() -> Vec<Vec<ChatMessage>> {
    let m = ChatMessage::new;
    vec![
        vec![m("user", "What is the capital of France?")],
        vec![
            m("system", "You are a terse assistant."),
            m("user", "Name a prime number."),
        ],
        vec![
            m("system", "Answer in French."),
            m("user", "Hello!"),
            m("assistant", "Bonjour ! Comment puis-je vous aider ?"),
            m("user", "  Count to three.  "),
        ],
    ]
}

fn templates() -> Vec<(String, String)> {
    let dir = std::env::var_os("ALLMENDE_LLAMA_CPP_DIR")
        .map(PathBuf::from)
        .expect(
            "ALLMENDE_LLAMA_CPP_DIR is not set: run scripts/llama-cpp.sh (scripts/test.sh sets it)",
        )
        .join("src/models/templates");
    let mut out: Vec<(String, String)> = TEMPLATES
        .iter()
        .map(|name| {
            let path = dir.join(format!("{name}.jinja"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name.to_string(), text)
        })
        .collect();
    let gguf = GgufFile::open(&support::model_path()).unwrap();
    let own = gguf.string("tokenizer.chat_template").unwrap().to_string();
    out.push(("SmolLM2-135M-Instruct (the test model)".into(), own));
    out
}

#[test]
fn templates_render_as_transformers_renders_them() {
    let python = std::env::var("ALLMENDE_TEST_PYTHON").expect(
        "ALLMENDE_TEST_PYTHON is not set: the Python with jinja2 (scripts/test.sh sets it)",
    );
    let (bos, eos) = ("<s>", "</s>");
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (name, template) in templates() {
        for messages in conversations() {
            cases.push(json!({"template": template, "messages": messages, "bos": bos, "eos": eos}));
            ours.push((
                name.clone(),
                messages.len(),
                render(&template, &messages, true, bos, eos),
            ));
        }
    }
    let mut child = Command::new(&python)
        .args(["-c", JINJA2])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the test Python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&cases).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jinja2 rendering failed");
    let theirs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut rendered = 0;
    for ((name, turns, mine), reference) in ours.iter().zip(&theirs) {
        match (mine, reference.get("ok").and_then(Value::as_str)) {
            (Ok(mine), Some(reference)) => {
                assert_eq!(mine, reference, "{name}, {turns} messages");
                rendered += 1;
            }
            // A template may refuse a conversation (a system message, say): then
            // both must refuse it.
            (Err(_), None) => {}
            (mine, _) => panic!("{name}, {turns} messages: ours {mine:?}, jinja2 {reference}"),
        }
    }
    eprintln!(
        "{rendered} of {} renderings identical; the rest refused by both",
        ours.len()
    );
    assert!(rendered >= ours.len() - 3, "too few conversations rendered");
}
