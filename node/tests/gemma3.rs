//! Gemma 3 (the real 270M file, `scripts/fetch-gemma3.sh`; `scripts/test.sh` passes
//! it as `ALLMENDE_GEMMA3`) against llama.cpp's llama-server run on the same file
//! (from `ALLMENDE_LLAMA_CPP_DIR`, on 127.0.0.1): tokenization of varied texts, greedy
//! continuations up to near-ties, prompts longer than the sliding window, and the
//! model split between local and global layers equal to itself unsplit, bit for bit.

mod support;

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use allmende_node::client::chat_template::ChatMessage;
use allmende_node::client::{
    generate, ClientModel, Generation, GenerationParams, LocalPipeline, SamplingParams,
};
use allmende_node::model::{GgufFile, Shard};
use allmende_protocol::LayerRange;
use serde_json::{json, Value};

use support::http::{free_port, request};

/// A divergence where either side prefers its token by less than this (in nats) is a
/// near-tie: llama.cpp rounds queries to 16 bits in attention and sums in another
/// order, and both sides quantize activations with their own rounding.
const NEAR_TIE: f32 = 0.5;

/// Top log-probabilities asked of both sides at each generated position.
const TOP: usize = 10;

fn gemma_path() -> PathBuf {
    let path = std::env::var_os("ALLMENDE_GEMMA3").map(PathBuf::from).expect(
        "ALLMENDE_GEMMA3 is not set: run scripts/fetch-gemma3.sh and point it at the file it prints (scripts/test.sh does)",
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-gemma3.sh",
        path.display()
    );
    path
}

/// llama-server on the Gemma file, on a free port of 127.0.0.1; killed when dropped.
struct LlamaServer {
    child: Child,
    addr: SocketAddr,
}

impl LlamaServer {
    fn start() -> Self {
        let dir = std::env::var_os("ALLMENDE_LLAMA_CPP_DIR").map(PathBuf::from).expect(
            "ALLMENDE_LLAMA_CPP_DIR is not set: run scripts/llama-cpp.sh and point it at the directory above build/ (scripts/test.sh does)",
        );
        let bin = dir.join("build/bin");
        let port = free_port();
        let child = Command::new(bin.join("llama-server"))
            .env("LD_LIBRARY_PATH", &bin)
            .arg("-m")
            .arg(gemma_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "-t",
                "1",
                "-c",
                "2048",
                "-np",
                "1",
                "--chat-template",
                "gemma",
                // Without Jinja, the name picks llama.cpp's built-in format.
                "--no-jinja",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llama-server starts");
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if std::net::TcpStream::connect(server.addr).is_ok()
                && request(server.addr, "GET", "/health", None).0 == 200
            {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("llama-server exited: {status}");
            }
            assert!(Instant::now() < deadline, "llama-server never served");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `messages` in llama.cpp's built-in `gemma` chat format, with the opening of
    /// the model's turn.
    fn apply_template(&self, messages: &Value) -> String {
        let body = json!({"messages": messages});
        let (status, reply) = request(self.addr, "POST", "/apply-template", Some(&body));
        assert_eq!(status, 200, "{reply}");
        reply["prompt"].as_str().expect("a prompt").to_string()
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        let body = json!({"content": text, "add_special": true});
        let (status, reply) = request(self.addr, "POST", "/tokenize", Some(&body));
        assert_eq!(status, 200, "{reply}");
        ids(&reply["tokens"])
    }

    /// Greedy continuation of `prompt` (token ids): the ids, and per position the
    /// chosen token's log-probability and the top ones.
    fn complete(&self, prompt: &[u32], tokens: usize) -> Vec<(u32, Vec<(u32, f32)>)> {
        let body = json!({
            "prompt": prompt, "n_predict": tokens, "temperature": 0, "top_k": 1,
            "cache_prompt": false, "ignore_eos": true, "n_probs": TOP,
        });
        let (status, reply) = request(self.addr, "POST", "/completion", Some(&body));
        assert_eq!(status, 200, "{reply}");
        let positions = reply["completion_probabilities"]
            .as_array()
            .expect("log-probabilities");
        positions
            .iter()
            .map(|p| {
                let top = p["top_logprobs"].as_array().expect("top log-probabilities");
                let top = top
                    .iter()
                    .map(|t| (id(&t["id"]), t["logprob"].as_f64().unwrap() as f32))
                    .collect();
                (id(&p["id"]), top)
            })
            .collect()
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn id(v: &Value) -> u32 {
    v.as_u64().expect("a token id") as u32
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("token ids").iter().map(id).collect()
}

fn server() -> &'static LlamaServer {
    static SERVER: OnceLock<LlamaServer> = OnceLock::new();
    SERVER.get_or_init(LlamaServer::start)
}

struct Loaded {
    model: ClientModel,
    whole: Arc<Shard>,
}

fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let mut gguf = GgufFile::open(&gemma_path()).unwrap();
        let model = ClientModel::from_gguf(&mut gguf).unwrap();
        let all = LayerRange::new(0, model.config.block_count as u32);
        let whole = shard(&mut gguf, &model, all);
        Loaded { model, whole }
    })
}

fn shard(gguf: &mut GgufFile, model: &ClientModel, range: LayerRange) -> Arc<Shard> {
    let hidden = indicatif::ProgressBar::hidden();
    Arc::new(Shard::from_gguf(gguf, model.config.clone(), range, &hidden).unwrap())
}

fn ours(shards: Vec<Arc<Shard>>, prompt: &[u32], tokens: usize) -> Generation {
    let params = GenerationParams {
        max_tokens: tokens,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        logprobs: Some(TOP),
    };
    let mut pipeline = LocalPipeline::new(shards, prompt.len() + tokens);
    generate(&loaded().model, &mut pipeline, prompt, &params, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

/// Ours against llama.cpp on `text`: the same prompt ids, the same greedy tokens up
/// to the first divergence, which must be a near-tie on both sides. Returns how many
/// of the `tokens` agree.
fn agrees(text: &str, tokens: usize) -> usize {
    let Loaded { model, whole } = loaded();
    let prompt = model.tokenizer.encode(text).unwrap();
    assert_eq!(prompt, server().tokenize(text), "tokenization of {text:?}");
    let theirs = server().complete(&prompt, tokens);
    let ours = ours(vec![whole.clone()], &prompt, tokens);
    let logprobs = ours.logprobs.as_ref().unwrap();
    let agreed = ours
        .token_ids
        .iter()
        .zip(&theirs)
        .take_while(|(a, (b, _))| *a == b)
        .count();
    eprintln!(
        "{} prompt tokens: {agreed} of {tokens} generated tokens equal",
        prompt.len()
    );
    if agreed < tokens {
        let (mine, (their, their_top)) = (ours.token_ids[agreed], &theirs[agreed]);
        let ours_of = |t: u32| {
            logprobs[agreed]
                .top
                .iter()
                .find(|x| x.token_id == t)
                .map(|x| x.logprob)
        };
        let theirs_of = |t: u32| their_top.iter().find(|x| x.0 == t).map(|x| x.1);
        let our_margin = ours_of(mine).zip(ours_of(*their)).map(|(a, b)| a - b);
        let their_margin = theirs_of(*their).zip(theirs_of(mine)).map(|(a, b)| a - b);
        eprintln!(
            "  position {agreed}: ours {mine} by {our_margin:?}, llama.cpp's {their} by {their_margin:?}"
        );
        assert!(
            our_margin.is_some_and(|m| m < NEAR_TIE) && their_margin.is_some_and(|m| m < NEAR_TIE),
            "{text:?} position {agreed}: ours {mine} (by {our_margin:?} nats), llama.cpp's {their} (by {their_margin:?}): not a near-tie"
        );
    }
    agreed
}

/// A prompt of well over 512 tokens (the window of the local layers).
fn counting() -> String {
    let numbers: Vec<String> = (1..200).map(|n| n.to_string()).collect();
    format!("Count: {}", numbers.join(", "))
}

fn prose() -> String {
    let sentence = "The river ran past the old mill, where the miller's daughter counted \
                    sacks of grain and sang about the seasons. ";
    let mut text = String::from("A story.\n\n");
    for (i, season) in ["spring", "summer", "autumn", "winter"]
        .iter()
        .cycle()
        .take(24)
        .enumerate()
    {
        text.push_str(&format!("In the {season} of year {}: {sentence}", 1800 + i));
    }
    text
}

#[test]
fn tokenizes_as_llama_cpp() {
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
    let tokenizer = &loaded().model.tokenizer;
    let mut equal = 0;
    for text in texts {
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            server().tokenize(text),
            "tokenization of {text:?}"
        );
        equal += 1;
    }
    eprintln!("{equal} of {} texts tokenize as llama.cpp's", texts.len());
}

#[test]
fn generates_as_llama_cpp_up_to_near_ties() {
    for text in [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colors are",
        "Water boils at",
    ] {
        agrees(text, 24);
    }
}

#[test]
fn prompts_past_the_window_generate_as_llama_cpp() {
    for text in [counting(), prose()] {
        let prompt = loaded().model.tokenizer.encode(&text).unwrap();
        assert!(prompt.len() > 600, "{} tokens", prompt.len());
        agrees(&text, 16);
    }
}

/// Split where local and global layers meet (layer 5 is the first global one, 11 the
/// second), the long prompt through every cut: the same tokens and the same
/// log-probabilities, bit for bit, as the unsplit model.
#[test]
fn split_equals_unsplit_bit_for_bit() {
    let Loaded { model, whole } = loaded();
    let mut gguf = GgufFile::open(&gemma_path()).unwrap();
    let shards = [(0, 5), (5, 6), (6, 11), (11, 12), (12, 18)]
        .map(|(a, b)| shard(&mut gguf, model, LayerRange::new(a, b)))
        .to_vec();
    let prompt = model.tokenizer.encode(&counting()).unwrap();
    let split = ours(shards, &prompt, 8);
    let unsplit = ours(vec![whole.clone()], &prompt, 8);
    assert_eq!(split.token_ids, unsplit.token_ids);
    let bits = |g: &Generation| -> Vec<(u32, u32)> {
        let lp = g.logprobs.as_ref().unwrap();
        lp.iter()
            .flat_map(|p| p.top.iter().map(|t| (t.token_id, t.logprob.to_bits())))
            .collect()
    };
    assert_eq!(bits(&split), bits(&unsplit));
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
