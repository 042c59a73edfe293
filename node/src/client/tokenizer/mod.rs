//! The model's tokenizer, rebuilt with the `tokenizers` crate from the vocabulary and
//! merges (or scores) stored in the GGUF file, so no separate tokenizer.json is
//! needed: byte-level BPE (`gpt2`) in [`bpe`], SentencePiece-style `llama` in [`spm`].

mod bpe;
mod spm;

use bpe::{byte_level_bpe, PreTokenizer};

use tokenizers::{AddedToken, Tokenizer};

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
    "<end_of_turn>",
];

pub struct ModelTokenizer {
    inner: Tokenizer,
    /// `inner` with control tokens' texts read as plain text, for text a user wrote.
    literal: Tokenizer,
    /// Ids of the control and user-defined tokens, in order.
    controls: Vec<u32>,
    bos: Option<u32>,
    add_bos: bool,
    eos: u32,
    end_of_generation: Vec<u32>,
    chat_template: Option<String>,
    /// Every token's text, decoded once on first use ([`Self::token_pieces`]): an
    /// answer with log-probabilities names ~21 tokens per generated token.
    pieces: std::sync::OnceLock<Vec<String>>,
}

/// `tokenizer.ggml.` keys this tokenizer applies, or that do not change what it does
/// (special-token ids it does not insert, scores a BPE model does not use).
const UNDERSTOOD_KEYS: &[&str] = &[
    "model",
    "pre",
    "tokens",
    "token_type",
    "token_type_count",
    "merges",
    "scores",
    "bos_token_id",
    "eos_token_id",
    "eot_token_id",
    "eom_token_id",
    "unknown_token_id",
    "padding_token_id",
    "seperator_token_id",
    "cls_token_id",
    "mask_token_id",
    "prefix_token_id",
    "suffix_token_id",
    "middle_token_id",
    "fim_pre_token_id",
    "fim_suf_token_id",
    "fim_mid_token_id",
    "fim_pad_token_id",
    "fim_rep_token_id",
    "fim_sep_token_id",
];

/// Flags this tokenizer implements only in their `false` setting.
const FLAGS_ONLY_FALSE: &[&str] = &[
    "add_eos_token",
    "add_space_prefix",
    "add_sep_token",
    "remove_extra_whitespaces",
];

/// Refuses tokenizer metadata that would change tokenization in a way this tokenizer
/// does not implement: ignoring it would give wrong token ids silently. `applied`:
/// flags the tokenizer of this vocabulary applies in either setting.
fn check_keys(gguf: &GgufFile, applied: &[&str]) -> Result<(), ModelError> {
    use candle_core::quantized::gguf_file::Value;
    for key in gguf.metadata_keys() {
        let Some(field) = key.strip_prefix("tokenizer.ggml.") else {
            continue;
        };
        if UNDERSTOOD_KEYS.contains(&field) || field == "add_bos_token" || applied.contains(&field)
        {
            continue;
        }
        if FLAGS_ONLY_FALSE.contains(&field) {
            match gguf.metadata(key) {
                Some(Value::Bool(false)) => continue,
                _ => {
                    return Err(ModelError::NotUnderstood(format!(
                        "metadata {key} is set, and this tokenizer does not apply it"
                    )))
                }
            }
        }
        return Err(ModelError::NotUnderstood(format!(
            "metadata {key}: this tokenizer does not know it"
        )));
    }
    Ok(())
}

impl ModelTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let model = gguf.string("tokenizer.ggml.model")?;
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let types = int_array(gguf, "tokenizer.ggml.token_type").unwrap_or_default();
        let (mut inner, family) = match model {
            "gpt2" => {
                check_keys(gguf, &[])?;
                let pre = gguf.string("tokenizer.ggml.pre").unwrap_or("default");
                let family = PreTokenizer::from_name(pre)?;
                (byte_level_bpe(gguf, &tokens, family)?, Some(family))
            }
            "llama" => {
                check_keys(gguf, &["add_space_prefix"])?;
                let scores = float_array(gguf, "tokenizer.ggml.scores")?;
                let unknown = gguf
                    .usize("tokenizer.ggml.unknown_token_id")
                    .ok()
                    .and_then(|id| tokens.get(id).copied());
                let space_prefix = !matches!(
                    gguf.metadata("tokenizer.ggml.add_space_prefix"),
                    Some(candle_core::quantized::gguf_file::Value::Bool(false))
                );
                let spm = spm::build(&tokens, &scores, &types, unknown, space_prefix)?;
                (spm, None)
            }
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "tokenizer.ggml.model = {other:?}; supported are byte-level BPE (\"gpt2\") and SentencePiece-style (\"llama\")"
                )))
            }
        };
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);
        let mut literal = inner.clone();
        literal.set_encode_special_tokens(true);
        let mut controls: Vec<u32> = special
            .iter()
            .filter_map(|t| inner.token_to_id(&t.content))
            .collect();
        controls.sort_unstable();

        let eos = gguf.usize("tokenizer.ggml.eos_token_id")? as u32;
        let mut end_of_generation = vec![eos];
        // Turn ends the model declares (Llama 3's <|eot_id|>, <|eom_id|>).
        end_of_generation.extend(
            ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
                .iter()
                .filter_map(|k| gguf.usize(k).ok())
                .map(|id| id as u32),
        );
        end_of_generation.extend(
            END_OF_GENERATION
                .iter()
                .filter_map(|t| inner.token_to_id(t)),
        );
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(Self {
            inner,
            literal,
            controls,
            bos: gguf
                .usize("tokenizer.ggml.bos_token_id")
                .ok()
                .map(|b| b as u32),
            // llama.cpp's default where the file does not say: Llama 3 and
            // SentencePiece vocabularies begin with BOS.
            add_bos: match gguf.metadata("tokenizer.ggml.add_bos_token") {
                Some(candle_core::quantized::gguf_file::Value::Bool(b)) => *b,
                _ => matches!(family, Some(PreTokenizer::Llama3) | None),
            },
            eos,
            end_of_generation,
            chat_template: gguf
                .string("tokenizer.chat_template")
                .ok()
                .map(String::from)
                .or_else(|| {
                    let name = gguf.string("general.architecture").ok()?;
                    crate::model::arch::find(name)?
                        .default_chat_template()
                        .map(String::from)
                }),
            pieces: std::sync::OnceLock::new(),
        })
    }

    /// Token ids of `text`. Control tokens written in the text (e.g. `<|im_start|>`)
    /// become their ids, as chat templates need; BOS is added only if the model asks.
    /// A text that itself begins with BOS (a chat template that writes it, as Llama 3's
    /// does) gets no second one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self.with_bos(self.encode_without_bos(text)?))
    }

    /// Token ids of a rendered chat prompt, as [`encode`](Self::encode) gives them,
    /// except that in the byte ranges `literal` (what users wrote: message contents)
    /// the text of a control token is text: a user cannot end a turn or speak as the
    /// system by typing `<|im_end|>`. Where no control token falls in those ranges,
    /// which is every honest prompt, the ids are exactly `encode`'s; otherwise the
    /// prompt is tokenized piece by piece at the ranges' edges.
    pub fn encode_with_literals(
        &self,
        text: &str,
        literal: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>, ModelError> {
        let err = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
        let whole = self.inner.encode(text, false).map_err(err)?;
        let smuggled = whole
            .get_ids()
            .iter()
            .zip(whole.get_offsets())
            .filter(|(id, _)| self.controls.binary_search(id).is_ok())
            .any(|(_, &(start, end))| literal.iter().any(|r| start < r.end && r.start < end));
        if !smuggled {
            return Ok(self.with_bos(whole.get_ids().to_vec()));
        }
        let mut ids = Vec::with_capacity(whole.len() + 8);
        let mut at = 0;
        for range in literal {
            if range.start < at || range.end > text.len() {
                return Err(ModelError::Tokenizer(
                    "literal ranges must be in order and inside the text".into(),
                ));
            }
            let template = text.get(at..range.start);
            let user = text.get(range.clone());
            let (Some(template), Some(user)) = (template, user) else {
                return Err(ModelError::Tokenizer(
                    "a literal range does not fall on character boundaries".into(),
                ));
            };
            ids.extend(self.inner.encode(template, false).map_err(err)?.get_ids());
            ids.extend(self.literal.encode(user, false).map_err(err)?.get_ids());
            at = range.end;
        }
        ids.extend(
            self.inner
                .encode(&text[at..], false)
                .map_err(err)?
                .get_ids(),
        );
        Ok(self.with_bos(ids))
    }

    /// Whether `text` holds the text of a control or user-defined token.
    pub fn has_control_text(&self, text: &str) -> Result<bool, ModelError> {
        let ids = self.encode_without_bos(text)?;
        Ok(ids.iter().any(|id| self.controls.binary_search(id).is_ok()))
    }

    /// Whether `id` is a control or user-defined token.
    pub fn is_control(&self, id: u32) -> bool {
        self.controls.binary_search(&id).is_ok()
    }

    fn with_bos(&self, body: Vec<u32>) -> Vec<u32> {
        match self.bos {
            Some(bos) if self.add_bos && body.first() != Some(&bos) => {
                std::iter::once(bos).chain(body).collect()
            }
            _ => body,
        }
    }

    /// Token ids of `text` alone, with no BOS: llama.cpp's tokenizer test vectors.
    pub fn encode_without_bos(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, without control tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The text of one token, control tokens included (a token that holds part of a
    /// character shows U+FFFD for it); empty for an id past the vocabulary.
    pub fn token_piece(&self, id: u32) -> &str {
        self.token_pieces()
            .get(id as usize)
            .map_or("", String::as_str)
    }

    /// Every token's text ([`Self::token_piece`]), indexed by id. The first call
    /// decodes the whole vocabulary (tens of milliseconds): make it off the async
    /// runtime.
    pub fn token_pieces(&self) -> &[String] {
        self.pieces.get_or_init(|| {
            (0..self.inner.get_vocab_size(true) as u32)
                .map(|id| self.inner.decode(&[id], false).unwrap_or_default())
                .collect()
        })
    }

    /// The tokens that end a generation, in id order.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
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

fn float_array(gguf: &GgufFile, key: &str) -> Result<Vec<f32>, ModelError> {
    use candle_core::quantized::gguf_file::Value;
    gguf.array(key)?
        .iter()
        .map(|v| match v {
            Value::F32(x) => Ok(*x),
            _ => Err(ModelError::BadMetadata(
                key.to_string(),
                "an array of floats",
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
