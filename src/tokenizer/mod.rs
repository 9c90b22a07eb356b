//! Tokenizers: Hugging Face `tokenizer.json` (through the `tokenizers` crate) and SentencePiece
//! `tokenizer.model` (what InternLM2 ships), behind one type.
//!
//! BOS/EOS come from `tokenizer_config.json` / `special_tokens_map.json` next to the tokenizer
//! file when present (as transformers reads them), else from well-known token names.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A loaded tokenizer with its special-token ids.
pub struct Tokenizer {
    backend: Backend,
    bos: Option<u32>,
    eos: Option<u32>,
    fingerprint: String,
    /// The file it was loaded from.
    pub source: PathBuf,
}

enum Backend {
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Load from a `tokenizer.json` / `tokenizer.model` file or a directory holding one.
    pub fn from_path(path: &Path) -> Result<Tokenizer> {
        let file = resolve_file(path)?;
        let bytes = std::fs::read(&file)
            .with_context(|| format!("reading tokenizer {}", file.display()))?;
        let fingerprint = hex::encode(&Sha256::digest(&bytes)[..16]);
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let backend = if name.ends_with(".json") {
            let tk = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
                anyhow::anyhow!("{}: not a valid tokenizer.json: {e}", file.display())
            })?;
            Backend::Hf(Box::new(tk))
        } else {
            bail!(
                "{}: unsupported tokenizer file (expected tokenizer.json or tokenizer.model)",
                file.display()
            )
        };
        let mut t = Tokenizer {
            backend,
            bos: None,
            eos: None,
            fingerprint,
            source: file.clone(),
        };
        let (bos, eos) = special_tokens_from_config(file.parent().unwrap_or(Path::new(".")));
        t.bos = bos
            .as_deref()
            .and_then(|s| t.token_to_id(s))
            .or_else(|| t.first_known(&["<s>", "<|begin_of_text|>"]));
        t.eos = eos
            .as_deref()
            .and_then(|s| t.token_to_id(s))
            .or_else(|| t.first_known(&["</s>", "<|end_of_text|>", "<|endoftext|>"]));
        Ok(t)
    }

    /// Wrap an in-memory Hugging Face tokenizer (tests, the demo generator).
    pub fn from_hf(tk: tokenizers::Tokenizer, bos: Option<&str>, eos: Option<&str>) -> Tokenizer {
        let json = tk.to_string(false).unwrap_or_default();
        let fingerprint = hex::encode(&Sha256::digest(json.as_bytes())[..16]);
        let mut t = Tokenizer {
            backend: Backend::Hf(Box::new(tk)),
            bos: None,
            eos: None,
            fingerprint,
            source: PathBuf::from("<memory>"),
        };
        t.bos = bos.and_then(|s| t.token_to_id(s));
        t.eos = eos.and_then(|s| t.token_to_id(s));
        t
    }

    fn first_known(&self, names: &[&str]) -> Option<u32> {
        names.iter().find_map(|n| self.token_to_id(n))
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's own post-processor runs
    /// (e.g. a BOS for Llama); XTuner encodes with it off and adds BOS itself.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf(tk) => Ok(tk
                .encode(text, add_special_tokens)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match &self.backend {
            Backend::Hf(tk) => tk
                .decode(ids, skip_special_tokens)
                .map_err(|e| anyhow::anyhow!("decoding: {e}")),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf(tk) => tk.token_to_id(token),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(tk) => tk.id_to_token(id),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(tk) => tk.get_vocab_size(true),
        }
    }

    /// A short hash of the tokenizer file's bytes (dataset cache keys, checkpoint checks).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// The tokenizer file for a path: the file itself, or tokenizer.json / tokenizer.model inside a dir.
fn resolve_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        for name in ["tokenizer.json", "tokenizer.model"] {
            let f = path.join(name);
            if f.is_file() {
                return Ok(f);
            }
        }
        bail!(
            "{}: no tokenizer.json or tokenizer.model in this directory",
            path.display()
        );
    }
    bail!("tokenizer path {} does not exist", path.display())
}

/// (bos_token, eos_token) strings from tokenizer_config.json or special_tokens_map.json.
fn special_tokens_from_config(dir: &Path) -> (Option<String>, Option<String>) {
    let read = |name: &str, key: &str| -> Option<String> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        match v.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
            _ => None,
        }
    };
    let get = |key: &str| {
        read("tokenizer_config.json", key).or_else(|| read("special_tokens_map.json", key))
    };
    (get("bos_token"), get("eos_token"))
}
