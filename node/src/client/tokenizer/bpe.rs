//! Byte-level BPE (`gpt2`): the vocabulary and merges from the file, and the
//! pre-tokenizer family `tokenizer.ggml.pre` names, each split as llama.cpp splits it.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use super::string_array;
use crate::model::gguf::GgufFile;
use crate::model::ModelError;

/// Llama 3's pre-tokenizer split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's: Llama 3's with every digit on its own (`LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer (`gpt2`) from the file's tokens and merges.
pub(super) fn byte_level_bpe(
    gguf: &GgufFile,
    tokens: &[&str],
    family: PreTokenizer,
) -> Result<Tokenizer, ModelError> {
    let merges = string_array(gguf, "tokenizer.ggml.merges")?;
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
        // Llama 3 takes a pre-token that is itself in the vocabulary whole, as
        // llama.cpp does (`ignore_merges`), even where merges would split it.
        .ignore_merges(family == PreTokenizer::Llama3)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(family.steps()?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// The pre-tokenizer families of `tokenizer.ggml.pre` that this tokenizer implements,
/// each as llama.cpp does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PreTokenizer {
    /// SmolLM: every digit on its own, then GPT-2's split, no prefix space.
    SmolLm,
    Gpt2,
    Llama3,
    Qwen2,
}

impl PreTokenizer {
    pub(super) fn from_name(pre: &str) -> Result<Self, ModelError> {
        Ok(match pre {
            "smollm" => Self::SmolLm,
            "gpt2" | "gpt-2" | "default" => Self::Gpt2,
            "llama3" | "llama-v3" | "llama-bpe" => Self::Llama3,
            "qwen2" => Self::Qwen2,
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "pre-tokenizer {other:?} is not supported (supported: smollm, gpt2, gpt-2, llama-bpe, qwen2)"
                )))
            }
        })
    }

    fn steps(self) -> Result<Sequence, ModelError> {
        let byte_level =
            |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
        let split = |pattern: &str| {
            Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
        };
        let steps = match self {
            Self::SmolLm => vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ],
            Self::Gpt2 => vec![byte_level(true)],
            Self::Llama3 => vec![split(LLAMA3_SPLIT)?, byte_level(false)],
            Self::Qwen2 => vec![split(QWEN2_SPLIT)?, byte_level(false)],
        };
        Ok(Sequence::new(steps))
    }
}
