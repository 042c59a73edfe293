//! The model's tokenizer, rebuilt with the `tokenizers` crate from the vocabulary and
//! merges stored in the GGUF file, so no separate tokenizer.json is needed.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::model::gguf::GgufFile;
use crate::model::ModelError;

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Control tokens that end a turn or a document in common chat formats.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
];

/// Llama 3's pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct ModelTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eos: u32,
    end_of_generation: Vec<u32>,
    chat_template: Option<String>,
}

impl ModelTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.model = {model:?}; only byte-level BPE (\"gpt2\") is supported"
            )));
        }
        let pre = gguf.string("tokenizer.ggml.pre").unwrap_or("default");
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let merges = string_array(gguf, "tokenizer.ggml.merges")?;
        let types = int_array(gguf, "tokenizer.ggml.token_type").unwrap_or_default();

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);

        let eos = gguf.usize("tokenizer.ggml.eos_token_id")? as u32;
        let mut end_of_generation = vec![eos];
        end_of_generation.extend(
            END_OF_GENERATION
                .iter()
                .filter_map(|t| inner.token_to_id(t)),
        );
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(Self {
            inner,
            bos: gguf
                .usize("tokenizer.ggml.bos_token_id")
                .ok()
                .map(|b| b as u32),
            add_bos: matches!(
                gguf.metadata("tokenizer.ggml.add_bos_token"),
                Some(candle_core::quantized::gguf_file::Value::Bool(true))
            ),
            eos,
            end_of_generation,
            chat_template: gguf
                .string("tokenizer.chat_template")
                .ok()
                .map(String::from),
        })
    }

    /// Token ids of `text`. Control tokens written in the text (e.g. `<|im_start|>`)
    /// become their ids, as chat templates need; BOS is added only if the model asks.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, without control tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<Sequence, ModelError> {
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let steps = match pre {
        // SmolLM: every digit on its own, then GPT-2's split, no prefix space.
        "smollm" => vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ],
        "gpt2" | "default" => vec![byte_level(true)],
        "llama3" | "llama-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            vec![PreTokenizerWrapper::Split(split), byte_level(false)]
        }
        other => {
            return Err(ModelError::Tokenizer(format!(
                "pre-tokenizer {other:?} is not supported (supported: smollm, gpt2, llama-bpe)"
            )))
        }
    };
    Ok(Sequence::new(steps))
}

fn string_array<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, ModelError> {
    use candle_core::quantized::gguf_file::Value;
    gguf.array(key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(ModelError::BadMetadata(
                key.to_string(),
                "an array of strings",
            )),
        })
        .collect()
}

fn int_array(gguf: &GgufFile, key: &str) -> Result<Vec<i32>, ModelError> {
    use candle_core::quantized::gguf_file::Value;
    gguf.array(key)?
        .iter()
        .map(|v| match v {
            Value::I32(x) => Ok(*x),
            Value::U32(x) => Ok(*x as i32),
            _ => Err(ModelError::BadMetadata(
                key.to_string(),
                "an array of integers",
            )),
        })
        .collect()
}
