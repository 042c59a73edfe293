//! A model file run by us against llama.cpp running it ([`LlamaServer`]): the same
//! prompt ids, the same greedy tokens up to the first divergence, which the exact
//! float64 reference must call a near-tie (or ours); and the model split into shards equal to itself unsplit,
//! bit for bit.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use allmende_node::client::{
    generate, ClientModel, Generation, GenerationParams, LocalPipeline, SamplingParams,
};
use allmende_node::model::{GgufFile, Shard};
use allmende_protocol::LayerRange;

use super::llama_cpp::{LlamaServer, TOP};

/// A divergence where the exact reference prefers llama.cpp's token by less than this
/// (in nats) is a near-tie, for a trained model: llama.cpp rounds queries to 16 bits
/// in attention and sums in another order, and both sides quantize activations with
/// their own rounding, each moving log-probabilities by up to a few tenths.
pub const NEAR_TIE: f32 = 0.5;

/// A model file loaded whole: its client side and all of its layers in one shard.
pub struct Loaded {
    pub model: ClientModel,
    pub whole: Arc<Shard>,
    path: PathBuf,
}

impl Loaded {
    pub fn open(path: &Path) -> Self {
        let mut gguf = GgufFile::open(path).unwrap();
        let model = ClientModel::from_gguf(&mut gguf).unwrap();
        let all = LayerRange::new(0, model.config.block_count as u32);
        let whole = shard(&mut gguf, &model, all);
        Self {
            model,
            whole,
            path: path.to_path_buf(),
        }
    }

    /// The layers `start..end` of each cut, a shard each.
    pub fn shards(&self, cuts: &[(u32, u32)]) -> Vec<Arc<Shard>> {
        let mut gguf = GgufFile::open(&self.path).unwrap();
        cuts.iter()
            .map(|&(a, b)| shard(&mut gguf, &self.model, LayerRange::new(a, b)))
            .collect()
    }

    /// Greedy generation of `tokens` after `prompt` through `shards`, with the top
    /// log-probabilities at each position.
    pub fn generate(&self, shards: Vec<Arc<Shard>>, prompt: &[u32], tokens: usize) -> Generation {
        let params = GenerationParams {
            max_tokens: tokens,
            sampling: SamplingParams::default(),
            ignore_eos: true,
            logprobs: Some(TOP),
        };
        let mut pipeline = LocalPipeline::new(shards, prompt.len() + tokens);
        generate(&self.model, &mut pipeline, prompt, &params, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
    }

    /// Ours against `server` on `text`: the same prompt ids, the same greedy tokens up
    /// to the first divergence, where the exact reference must prefer llama.cpp's
    /// token by less than `near_tie` nats (or prefer ours). Returns how many of the
    /// `tokens` agree.
    pub fn agrees(&self, server: &LlamaServer, text: &str, tokens: usize, near_tie: f32) -> usize {
        let prompt = self.model.tokenizer.encode(text).unwrap();
        assert_eq!(prompt, server.tokenize(text), "tokenization of {text:?}");
        let theirs = server.complete(&prompt, tokens);
        let ours = self.generate(vec![self.whole.clone()], &prompt, tokens);
        let logprobs = ours.logprobs.as_ref().unwrap();
        let agreed = ours
            .token_ids
            .iter()
            .zip(&theirs)
            .take_while(|(a, (b, _))| *a == b)
            .count();
        // How far the log-probabilities of the tokens both chose lie apart.
        let drift = ours.token_ids[..agreed]
            .iter()
            .zip(logprobs)
            .zip(&theirs)
            .filter_map(|((&t, mine), (_, their_top))| {
                let mine = mine.top.iter().find(|x| x.token_id == t)?.logprob;
                let their = their_top.iter().find(|x| x.0 == t)?.1;
                Some((mine - their).abs())
            })
            .fold(0f32, f32::max);
        eprintln!(
            "{} prompt tokens: {agreed} of {tokens} generated tokens equal, their log-probabilities at most {drift:.4} apart",
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
            let context: Vec<u32> = theirs[..=agreed].iter().map(|(t, _)| *t).collect();
            let exact = exact_logprobs(&self.path, &prompt, &context, agreed);
            let exact_of = |t: u32| exact.iter().find(|x| x.0 == t).map(|x| x.1);
            let exact_margin = exact_of(*their).zip(exact_of(mine)).map(|(a, b)| a - b);
            eprintln!(
                "  position {agreed}: ours {mine} by {our_margin:?}, llama.cpp's {their} by {their_margin:?}; the exact reference prefers llama.cpp's by {exact_margin:?}"
            );
            // The exact reference decides: ours is right, or the two are a near-tie
            // in exact arithmetic too.
            assert!(
                exact_margin.is_some_and(|m| m < near_tie),
                "{text:?} position {agreed}: ours {mine} (by {our_margin:?} nats), llama.cpp's {their} (by {their_margin:?}), and the exact reference prefers llama.cpp's by {exact_margin:?}: not a near-tie"
            );
        }
        agreed
    }

    /// The model cut into shards at `cuts`, `prompt` and `tokens` more through every
    /// cut: the same tokens and the same log-probabilities, bit for bit, as unsplit.
    pub fn split_equals_unsplit(&self, cuts: &[(u32, u32)], prompt: &[u32], tokens: usize) {
        let split = self.generate(self.shards(cuts), prompt, tokens);
        let unsplit = self.generate(vec![self.whole.clone()], prompt, tokens);
        assert_eq!(split.token_ids, unsplit.token_ids);
        let bits = |g: &Generation| -> Vec<(u32, u32)> {
            let lp = g.logprobs.as_ref().unwrap();
            lp.iter()
                .flat_map(|p| p.top.iter().map(|t| (t.token_id, t.logprob.to_bits())))
                .collect()
        };
        assert_eq!(bits(&split), bits(&unsplit));
    }
}

/// One model file, loaded by us and served by llama.cpp.
pub struct Subject {
    pub ours: Loaded,
    pub server: LlamaServer,
}

impl Subject {
    /// `path`, chatting in llama.cpp's built-in format `chat_format`.
    pub fn new(path: &Path, chat_format: &str) -> Self {
        Self {
            ours: Loaded::open(path),
            server: LlamaServer::start(path, chat_format),
        }
    }

    /// [`Loaded::agrees`] with a near-tie of [`NEAR_TIE`].
    pub fn agrees(&self, text: &str, tokens: usize) -> usize {
        self.ours.agrees(&self.server, text, tokens, NEAR_TIE)
    }

    /// The `short` prompts, then the `long` ones, which must each be of more than
    /// `longer_than` tokens, each continued for `tokens` as llama.cpp continues it up to
    /// a near-tie.
    pub fn generates_as_llama_cpp(
        &self,
        short: &[&str],
        long: &[String],
        longer_than: usize,
        tokens: usize,
    ) {
        for text in short {
            self.agrees(text, tokens);
        }
        for text in long {
            let prompt = self.ours.model.tokenizer.encode(text).unwrap();
            assert!(prompt.len() > longer_than, "{} tokens", prompt.len());
            self.agrees(text, tokens);
        }
    }
}

/// The exact (float64) reference's top log-probabilities of the token after
/// `prompt` + `continuation[..position]`, from `scripts/reference/exact.py` run on the
/// file's own weights (`ALLMENDE_TEST_PYTHON`, which has numpy and the `gguf` package).
fn exact_logprobs(
    path: &Path,
    prompt: &[u32],
    continuation: &[u32],
    position: usize,
) -> Vec<(u32, f32)> {
    let python = std::env::var("ALLMENDE_TEST_PYTHON").expect(
        "ALLMENDE_TEST_PYTHON is not set: run scripts/setup-test-deps.sh and point it at the Python it prints (scripts/test.sh does)",
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/exact.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    let request = serde_json::json!([{"prompt_token_ids": prompt, "token_ids": continuation}]);
    serde_json::to_writer(child.stdin.take().unwrap(), &request).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the exact reference failed");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    reply["outputs"][0]["top_logprobs"][position]
        .as_array()
        .expect("the exact reference's top log-probabilities")
        .iter()
        .map(|t| {
            (
                t["token_id"].as_u64().unwrap() as u32,
                t["logprob"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

fn shard(gguf: &mut GgufFile, model: &ClientModel, range: LayerRange) -> Arc<Shard> {
    let hidden = indicatif::ProgressBar::hidden();
    Arc::new(Shard::from_gguf(gguf, model.config.clone(), range, &hidden).unwrap())
}

/// "Count: 1, 2, ..." up to `last`: a prompt that grows with `last`, continued
/// predictably.
pub fn counting(last: usize) -> String {
    let numbers: Vec<String> = (1..=last).map(|n| n.to_string()).collect();
    format!("Count: {}", numbers.join(", "))
}

/// A story of `sentences` sentences, each naming a season and a year.
pub fn prose(sentences: usize) -> String {
    let sentence = "The river ran past the old mill, where the miller's daughter counted \
                    sacks of grain and sang about the seasons. ";
    let mut text = String::from("A story.\n\n");
    for (i, season) in ["spring", "summer", "autumn", "winter"]
        .iter()
        .cycle()
        .take(sentences)
        .enumerate()
    {
        text.push_str(&format!("In the {season} of year {}: {sentence}", 1800 + i));
    }
    text
}
