//! SentencePiece-style `llama` vocabularies (Llama 2, Mistral, TinyLlama, Phi-3):
//! pieces with scores and byte fallback, rebuilt as the `tokenizers` crate's BPE the
//! way `transformers` converts them. A merge is every split of a piece into two
//! pieces of the vocabulary, ranked by the merged piece's score (the highest first),
//! which is the order SentencePiece merges in; spaces become `▁`, and a `▁` begins
//! every stretch of text (at the start and after each special token), as llama.cpp
//! adds it.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as Decoders;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};
use tokenizers::Tokenizer;

use crate::model::ModelError;

/// GGUF token type of ordinary pieces (llama.cpp `LLAMA_TOKEN_TYPE_NORMAL`).
const TOKEN_TYPE_NORMAL: i32 = 1;

/// SentencePiece's stand-in for a space.
const SPACE: &str = "\u{2581}";

/// The tokenizer of a `llama` vocabulary: `tokens` with their `scores` and GGUF token
/// `types`; `unknown` names the unknown piece; `space_prefix` is
/// `tokenizer.ggml.add_space_prefix` (llama.cpp's default: true).
pub fn build(
    tokens: &[&str],
    scores: &[f32],
    types: &[i32],
    unknown: Option<&str>,
    space_prefix: bool,
) -> Result<Tokenizer, ModelError> {
    let err = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
    if scores.len() != tokens.len() {
        return Err(ModelError::Tokenizer(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let ids: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, i as u32))
        .collect();
    let normal = |id: u32| {
        types
            .get(id as usize)
            .is_none_or(|&t| t == TOKEN_TYPE_NORMAL)
    };
    // (score, piece, left, right): every split of a normal piece into two normal pieces.
    let mut merges: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let id = id as u32;
        if !normal(id) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                if normal(l) && normal(r) {
                    merges.push((scores[id as usize], id, l, r));
                }
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    let merges = merges
        .into_iter()
        .map(|(_, _, l, r)| {
            (
                tokens[l as usize].to_string(),
                tokens[r as usize].to_string(),
            )
        })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab =
        ids.iter().map(|(t, i)| (t.to_string(), *i)).collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unknown) = unknown {
        builder = builder.unk_token(unknown.to_string());
    }
    let mut tokenizer = Tokenizer::new(builder.build().map_err(err)?);
    let mut normalizers = Vec::new();
    if space_prefix {
        normalizers.push(Prepend::new(SPACE.to_string()).into());
    }
    normalizers.push(Replace::new(" ", SPACE).map_err(err)?.into());
    tokenizer.with_normalizer(Some(Normalizers::new(normalizers)));
    // No stripping of the space a prefix added: generated text has none, and its
    // first piece's space belongs to it.
    tokenizer.with_decoder(Some(Decoders::new(vec![
        DecoderWrapper::Replace(Replace::new(SPACE, " ").map_err(err)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ])));
    Ok(tokenizer)
}
