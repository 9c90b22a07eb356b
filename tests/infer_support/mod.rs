//! Toy models and a toy tokenizer for the inference tests.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::VecDeque;

use anyhow::{bail, Result};
use ftrun::infer::{CausalLm, TextCodec};

/// Special tokens of `ByteCodec`, after the 256 byte ids.
pub const BOS: u32 = 256;
pub const EOS: u32 = 257;
pub const IM_END: u32 = 258;
pub const IM_START: u32 = 259;
const SPECIALS: [&str; 4] = ["<s>", "</s>", "<|im_end|>", "<|im_start|>"];
/// First id of the multi-byte pieces given to `ByteCodec::with_pieces`.
pub const FIRST_PIECE: u32 = 260;

/// A byte-level tokenizer (id = byte, like byte-level BPE without merges) with four special
/// tokens and optional multi-byte pieces. Decoding is lossy UTF-8, so a split character shows
/// as U+FFFD exactly as with a real byte-level tokenizer.
pub struct ByteCodec {
    pieces: Vec<String>,
}

impl ByteCodec {
    pub fn new() -> ByteCodec {
        ByteCodec { pieces: Vec::new() }
    }
    pub fn with_pieces(pieces: &[&str]) -> ByteCodec {
        ByteCodec {
            pieces: pieces.iter().map(|s| s.to_string()).collect(),
        }
    }
    pub fn vocab_size(&self) -> usize {
        FIRST_PIECE as usize + self.pieces.len()
    }
    pub fn piece(&self, text: &str) -> u32 {
        FIRST_PIECE
            + self
                .pieces
                .iter()
                .position(|p| p == text)
                .expect("known piece") as u32
    }
    /// Byte ids of `text` (no special-token matching).
    pub fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }
}

impl TextCodec for ByteCodec {
    fn encode(&self, text: &str, _add_special_tokens: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (i, special) in SPECIALS.iter().enumerate() {
                if let Some(after) = rest.strip_prefix(special) {
                    ids.push(256 + i as u32);
                    rest = after;
                    continue 'outer;
                }
            }
            let c = rest.chars().next().unwrap();
            ids.extend(ByteCodec::bytes(&rest[..c.len_utf8()]));
            rest = &rest[c.len_utf8()..];
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut out = String::new();
        let mut bytes = Vec::new();
        for &id in ids {
            if id < 256 {
                bytes.push(id as u8);
                continue;
            }
            out += &String::from_utf8_lossy(&bytes);
            bytes.clear();
            if id < FIRST_PIECE {
                if !skip_special_tokens {
                    out += SPECIALS[(id - 256) as usize];
                }
            } else {
                match self.pieces.get((id - FIRST_PIECE) as usize) {
                    Some(p) => out += p,
                    None => bail!("unknown id {id}"),
                }
            }
        }
        out += &String::from_utf8_lossy(&bytes);
        Ok(out)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        SPECIALS
            .iter()
            .position(|s| *s == token)
            .map(|i| 256 + i as u32)
    }
    fn bos_id(&self) -> Option<u32> {
        Some(BOS)
    }
    fn eos_id(&self) -> Option<u32> {
        Some(EOS)
    }
}

/// A bigram model: the logits are the row of the last fed token. Records every
/// `forward_infer` call's ids.
pub struct BigramLm {
    pub table: Vec<Vec<f32>>, // [vocab, vocab]
    pub calls: RefCell<Vec<Vec<u32>>>,
}

impl BigramLm {
    /// A deterministic pseudo-random table (values in [-4, 4]).
    pub fn pseudo_random(vocab: usize, salt: u64) -> BigramLm {
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 8001) as f32 / 1000.0 - 4.0
        };
        let table = (0..vocab)
            .map(|_| (0..vocab).map(|_| next()).collect())
            .collect();
        BigramLm {
            table,
            calls: RefCell::new(Vec::new()),
        }
    }
}

impl CausalLm for BigramLm {
    type Cache = Vec<u32>;
    fn new_cache(&self) -> Vec<u32> {
        Vec::new()
    }
    fn forward_infer(&self, ids: &[u32], cache: &mut Vec<u32>) -> Result<Vec<f32>> {
        self.calls.borrow_mut().push(ids.to_vec());
        cache.extend_from_slice(ids);
        let last = *ids.last().expect("non-empty") as usize;
        Ok(self.table[last].clone())
    }
    fn cache_len(cache: &Vec<u32>) -> usize {
        cache.len()
    }
    fn vocab_size(&self) -> usize {
        self.table.len()
    }
}

/// A model that emits a fixed script: each forward call's logits favour the next scripted
/// token (EOS once the script is used up), whatever it is fed. Its cache is the list of every
/// token fed, and it records each call.
pub struct ScriptLm {
    pub vocab: usize,
    pub script: RefCell<VecDeque<u32>>,
    pub calls: RefCell<Vec<Vec<u32>>>,
}

impl ScriptLm {
    pub fn new(vocab: usize, script: &[u32]) -> ScriptLm {
        ScriptLm {
            vocab,
            script: RefCell::new(script.iter().copied().collect()),
            calls: RefCell::new(Vec::new()),
        }
    }
    /// Queue more tokens (the next answer).
    pub fn push_script(&self, ids: &[u32]) {
        self.script.borrow_mut().extend(ids);
    }
    pub fn calls(&self) -> Vec<Vec<u32>> {
        self.calls.borrow().clone()
    }
}

impl CausalLm for ScriptLm {
    type Cache = Vec<u32>;
    fn new_cache(&self) -> Vec<u32> {
        Vec::new()
    }
    fn forward_infer(&self, ids: &[u32], cache: &mut Vec<u32>) -> Result<Vec<f32>> {
        self.calls.borrow_mut().push(ids.to_vec());
        cache.extend_from_slice(ids);
        let next = self.script.borrow_mut().pop_front().unwrap_or(EOS);
        let mut logits = vec![0.0; self.vocab];
        logits[next as usize] = 10.0;
        Ok(logits)
    }
    fn cache_len(cache: &Vec<u32>) -> usize {
        cache.len()
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
