//! Turning a growing list of token ids into text pieces as they become printable.
//! A character may span several byte-level tokens, so a piece is released only once
//! it no longer ends in a partial UTF-8 sequence.

use super::ModelTokenizer;
use crate::model::ModelError;

pub struct TextStream<'a> {
    tokenizer: &'a ModelTokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a ModelTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds a token and returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, ModelError> {
        self.ids.push(id);
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let piece = after.get(before.len()..).map(str::to_string);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(piece)
    }
}
