//! Gemma 3 (the real 270M file, `scripts/fetch-gemma3.sh`; `scripts/test.sh` passes
//! it as `ALLMENDE_GEMMA3`) against llama.cpp's llama-server run on the same file
//! (from `ALLMENDE_LLAMA_CPP_DIR`, on 127.0.0.1): tokenization of varied texts, greedy
//! continuations up to near-ties, prompts longer than the sliding window, and the
//! model split between local and global layers equal to itself unsplit, bit for bit.
//! The same, fewer prompts, on the file requantized by llama.cpp to F16 and Q8_0, whose
//! matrices take other kernels than the shipped file's.

mod support;

use std::sync::OnceLock;

use allmende_node::client::chat_template::ChatMessage;
use serde_json::json;

use support::agreement::{counting, prose, Loaded, Subject};
use support::llama_cpp::{requantized, LlamaServer};

/// The window of the local layers.
const WINDOW: usize = 512;

/// The file as shipped.
fn shipped() -> &'static Subject {
    static SUBJECT: OnceLock<Subject> = OnceLock::new();
    SUBJECT.get_or_init(|| Subject::new(&support::gemma3_path(), "gemma"))
}

fn server() -> &'static LlamaServer {
    &shipped().server
}

fn loaded() -> &'static Loaded {
    &shipped().ours
}

fn requantized_to(kind: &str) -> Subject {
    Subject::new(
        &requantized(&support::gemma3_path(), "gemma3", kind),
        "gemma",
    )
}

fn f16() -> &'static Subject {
    static SUBJECT: OnceLock<Subject> = OnceLock::new();
    SUBJECT.get_or_init(|| requantized_to("F16"))
}

fn q8_0() -> &'static Subject {
    static SUBJECT: OnceLock<Subject> = OnceLock::new();
    SUBJECT.get_or_init(|| requantized_to("Q8_0"))
}

/// Prompts of well over one window.
fn long_prompts() -> [String; 2] {
    [counting(199), prose(24)]
}

/// Each of varied texts tokenized by `subject` as its llama.cpp tokenizes it.
fn tokenizes_texts_as_llama_cpp(subject: &Subject) {
    let texts = [
        "",
        " ",
        "Hello world",
        "  leading spaces and trailing  ",
        "Hello  world\n\n\tTabs and ünïcödé 日本語 emoji 🎉",
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "</s> <eos> <bos> <unk> <pad> [multimodal]",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
        "3.14159 2,718 1e-9 0x1F 100000000",
        "Ελληνικά, русский, العربية, עברית, हिन्दी, 한국어",
        "\n\n\n\n\n\n\n\n\n\n",
        "\t\t\t  \t",
        "ǅungla naïve café façade",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "A\u{00a0}B\u{2009}C\u{200b}D",
        "😀😃😄😁😆🥹 🏳️‍🌈 👩‍👩‍👧‍👦",
        "<0x41> <0xFF> ▁ ▁▁",
        "The capital of France is",
        "https://example.org/path?query=1&x=%20",
        "\u{0}\u{1}\u{7f}",
    ];
    let tokenizer = &subject.ours.model.tokenizer;
    let mut equal = 0;
    for text in texts {
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            subject.server.tokenize(text),
            "tokenization of {text:?}"
        );
        equal += 1;
    }
    eprintln!("{equal} of {} texts tokenize as llama.cpp's", texts.len());
}

#[test]
fn tokenizes_as_llama_cpp() {
    tokenizes_texts_as_llama_cpp(shipped());
}

#[test]
fn generates_as_llama_cpp_up_to_near_ties() {
    let short = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colors are",
        "Water boils at",
    ];
    shipped().generates_as_llama_cpp(&short, &[], WINDOW, 24);
}

#[test]
fn prompts_past_the_window_generate_as_llama_cpp() {
    shipped().generates_as_llama_cpp(&[], &long_prompts(), WINDOW, 16);
}

/// Requantized: the texts, two short prompts and a long one.
fn requantized_agrees(subject: &Subject) {
    tokenizes_texts_as_llama_cpp(subject);
    let short = ["The capital of France is", "def fibonacci(n):"];
    subject.generates_as_llama_cpp(&short, &[prose(24)], WINDOW, 24);
}

#[test]
fn f16_tokenizes_and_generates_as_llama_cpp_up_to_near_ties() {
    requantized_agrees(f16());
}

#[test]
fn q8_0_tokenizes_and_generates_as_llama_cpp_up_to_near_ties() {
    requantized_agrees(q8_0());
}

#[test]
fn split_equals_unsplit_bit_for_bit() {
    split_equals_unsplit(loaded());
}

#[test]
fn q8_0_split_equals_unsplit_bit_for_bit() {
    split_equals_unsplit(&q8_0().ours);
}

/// Split where local and global layers meet (layer 5 is the first global one, 11 the
/// second), the long prompt through every cut: the same tokens and the same
/// log-probabilities, bit for bit, as the unsplit model.
fn split_equals_unsplit(ours: &Loaded) {
    let prompt = ours.model.tokenizer.encode(&counting(199)).unwrap();
    assert!(prompt.len() > WINDOW, "{} tokens", prompt.len());
    let cuts = [(0, 5), (5, 6), (6, 11), (11, 12), (12, 18)];
    ours.split_equals_unsplit(&cuts, &prompt, 8);
}

/// The file has no chat template: chats use llama.cpp's built-in `gemma` format, as
/// llama-server renders it with `--chat-template gemma`, and tokenize as its text does.
#[test]
fn chats_in_llama_cpps_gemma_format() {
    let model = &loaded().model;
    let chats: [&[(&str, &str)]; 4] = [
        &[("user", "Hello!")],
        &[("system", "  Be brief. "), ("user", " What is 2 + 2?\n")],
        &[
            ("system", "You are a poet."),
            ("user", "Write a line."),
            ("assistant", "The sea is wide."),
            ("user", "Another."),
        ],
        &[
            ("system", "A"),
            ("system", "B"),
            ("assistant", "hi"),
            ("user", "x"),
        ],
    ];
    for chat in chats {
        let messages: Vec<ChatMessage> =
            chat.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect();
        let theirs = server().apply_template(&json!(chat
            .iter()
            .map(|(r, c)| json!({"role": r, "content": c}))
            .collect::<Vec<_>>()));
        assert_eq!(model.chat_prompt(&messages).unwrap(), theirs, "{chat:?}");
        assert_eq!(
            model.chat_prompt_ids(&messages).unwrap(),
            server().tokenize(&theirs),
            "{chat:?}"
        );
    }
}
