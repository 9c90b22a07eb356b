//! Text from token ids: the tokenizer interface inference needs, and an incremental decoder
//! that never yields half a character.

use anyhow::Result;

/// What inference needs from a tokenizer. `crate::tokenizer::Tokenizer` implements it; tests
/// implement it with toy vocabularies.
pub trait TextCodec {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>>;
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String>;
    fn token_to_id(&self, token: &str) -> Option<u32>;
    fn bos_id(&self) -> Option<u32>;
    fn eos_id(&self) -> Option<u32>;
}

impl TextCodec for crate::tokenizer::Tokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        crate::tokenizer::Tokenizer::encode(self, text, add_special_tokens)
    }
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        crate::tokenizer::Tokenizer::decode(self, ids, skip_special_tokens)
    }
    fn token_to_id(&self, token: &str) -> Option<u32> {
        crate::tokenizer::Tokenizer::token_to_id(self, token)
    }
    fn bos_id(&self) -> Option<u32> {
        crate::tokenizer::Tokenizer::bos_id(self)
    }
    fn eos_id(&self) -> Option<u32> {
        crate::tokenizer::Tokenizer::eos_id(self)
    }
}

/// The replacement character a byte-level decoder yields for an incomplete UTF-8 sequence.
const REPLACEMENT: char = '\u{FFFD}';

/// Decodes a growing list of ids into text, one delta at a time (the scheme of text-generation
/// inference's streamer): it re-decodes only a short window, so the cost per token does not
/// grow with the answer, and it holds text back while it ends in an incomplete character.
pub struct TextStream<'a> {
    codec: &'a dyn TextCodec,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the window that is re-decoded (tokens before it are final).
    prefix_offset: usize,
    /// End of the tokens whose text has been returned.
    read_offset: usize,
    /// All text returned so far.
    text: String,
}

impl<'a> TextStream<'a> {
    pub fn new(codec: &'a dyn TextCodec, skip_special_tokens: bool) -> TextStream<'a> {
        TextStream {
            codec,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
        }
    }

    /// Add one id; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let window_before = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let window_now = self.decode(&self.ids[self.prefix_offset..])?;
        // A decode that ends in U+FFFD is waiting for the rest of a multi-byte character.
        if window_now.len() <= window_before.len() || window_now.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let delta = match window_now.get(window_before.len()..) {
            Some(d) if window_now.starts_with(window_before.as_str()) => d.to_string(),
            // The tokenizer rewrote earlier text (e.g. a leading-space rule): emit only what
            // is new at the end, counted in characters after the common prefix.
            _ => common_suffix_after_prefix(&window_before, &window_now),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// The text still held back at the end of a generation (an incomplete character is
    /// returned as U+FFFD, as the tokenizer decodes it).
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let window_before = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let window_now = self.decode(&self.ids[self.prefix_offset..])?;
        let delta = common_suffix_after_prefix(&window_before, &window_now);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.text.push_str(&delta);
        Ok(delta)
    }

    /// Everything returned so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.codec.decode(ids, self.skip_special_tokens)
    }
}

/// The part of `now` after its longest common prefix with `before` (on a char boundary).
fn common_suffix_after_prefix(before: &str, now: &str) -> String {
    let common: usize = before
        .chars()
        .zip(now.chars())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a.len_utf8())
        .sum();
    now[common..].to_string()
}
