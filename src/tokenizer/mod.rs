//! Tokenizers: Hugging Face `tokenizer.json` (through the `tokenizers` crate) and SentencePiece
//! `tokenizer.model` (what InternLM2 and Llama 2 ship, parsed here without Python), behind one
//! type.
//!
//! Next to the tokenizer file, `tokenizer_config.json` / `special_tokens_map.json` give BOS/EOS
//! (as transformers reads them; `"bos_token": null` means no BOS) and, for SentencePiece, the
//! added tokens (`added_tokens_decoder`) and `add_bos_token` / `add_eos_token`.
//!
//! SentencePiece encoding follows transformers' slow tokenizer (InternLM2Tokenizer,
//! legacy LlamaTokenizer): added tokens are cut out of the text first (leftmost, longest; their
//! `lstrip`/`rstrip` flags trim the neighbouring text), then every remaining segment is encoded
//! by sentencepiece on its own, so each segment after a special token gets the dummy-prefix '▁'
//! (`<|im_start|>user` -> `<|im_start|>`, `▁user`). Without a tokenizer_config.json the text is
//! encoded by sentencepiece alone (its user-defined pieces still never split).

mod sentencepiece;

use anyhow::{bail, Context, Result};
use sentencepiece::{PieceKind, SentencePieceModel};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// A loaded tokenizer with its special-token ids.
pub struct Tokenizer {
    backend: Backend,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Ids that are control tokens (BOS/EOS/UNK, chat markers): hidden with `skip_special`.
    special_ids: HashSet<u32>,
    fingerprint: String,
    /// The file it was loaded from.
    pub source: PathBuf,
}

enum Backend {
    Hf(Box<tokenizers::Tokenizer>),
    SentencePiece(Box<SpBackend>),
}

/// A SentencePiece model plus what transformers layers on top of it.
struct SpBackend {
    model: SentencePieceModel,
    added: AddedTokens,
    add_bos: bool,
    add_eos: bool,
}

/// One entry of tokenizer_config.json `added_tokens_decoder`.
#[derive(Clone, Debug)]
struct AddedToken {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
    special: bool,
}

/// Added tokens, matched in raw text before the model sees it.
struct AddedTokens {
    tokens: Vec<AddedToken>,
    /// Indices into `tokens` by the first byte of their content, longest content first.
    by_first_byte: Vec<Vec<usize>>,
    by_id: HashMap<u32, usize>,
    by_content: HashMap<String, usize>,
}

/// A piece of input text: plain text for the model, or an added token.
enum Segment<'t> {
    Text(&'t str),
    Added(usize),
}

impl AddedTokens {
    fn new(tokens: Vec<AddedToken>) -> AddedTokens {
        let mut by_first_byte: Vec<Vec<usize>> = vec![Vec::new(); 256];
        let mut by_id = HashMap::new();
        let mut by_content = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            by_first_byte[t.content.as_bytes()[0] as usize].push(i);
            by_id.insert(t.id, i);
            by_content.insert(t.content.clone(), i);
        }
        for group in &mut by_first_byte {
            group.sort_by_key(|&i| std::cmp::Reverse(tokens[i].content.len()));
        }
        AddedTokens {
            tokens,
            by_first_byte,
            by_id,
            by_content,
        }
    }

    /// Cut `text` at added tokens (leftmost, longest first) and apply their strip flags.
    fn split<'t>(&self, text: &'t str) -> Vec<Segment<'t>> {
        let mut segments = Vec::new();
        let mut text_start = 0;
        let mut pos = 0;
        let bytes = text.as_bytes();
        while pos < bytes.len() {
            let found = self.by_first_byte[bytes[pos] as usize]
                .iter()
                .copied()
                .find(|&i| bytes[pos..].starts_with(self.tokens[i].content.as_bytes()));
            match found {
                Some(i) => {
                    segments.push(Segment::Text(&text[text_start..pos]));
                    segments.push(Segment::Added(i));
                    pos += self.tokens[i].content.len();
                    text_start = pos;
                }
                // Contents start with a character's first byte, so matches land on boundaries.
                None => pos += 1,
            }
        }
        segments.push(Segment::Text(&text[text_start..]));
        for i in 0..segments.len() {
            let Segment::Added(t) = segments[i] else {
                continue;
            };
            let token = &self.tokens[t];
            if token.lstrip && i > 0 {
                if let Segment::Text(s) = &mut segments[i - 1] {
                    *s = s.trim_end();
                }
            }
            if token.rstrip {
                if let Some(Segment::Text(s)) = segments.get_mut(i + 1) {
                    *s = s.trim_start();
                }
            }
        }
        segments
    }
}

impl SpBackend {
    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        for segment in self.added.split(text) {
            match segment {
                Segment::Text(s) => self.model.encode(s, out),
                Segment::Added(i) => out.push(self.added.tokens[i].id),
            }
        }
    }

    /// Runs of model ids decode as sentencepiece does (each run after an added token loses its
    /// dummy-prefix space again); added tokens decode to their content.
    fn decode(&self, ids: &[u32], skip_special: bool, out: &mut String) {
        let mut run_start = 0;
        for (i, id) in ids.iter().enumerate() {
            let Some(&t) = self.added.by_id.get(id) else {
                continue;
            };
            self.model.decode(&ids[run_start..i], out);
            run_start = i + 1;
            let token = &self.added.tokens[t];
            if !(skip_special && token.special) {
                out.push_str(&token.content);
            }
        }
        self.model.decode(&ids[run_start..], out);
    }

    fn vocab_size(&self) -> usize {
        let max_added = self.added.tokens.iter().map(|t| t.id as usize + 1).max();
        self.model.len().max(max_added.unwrap_or(0))
    }
}

/// What tokenizer_config.json / special_tokens_map.json say about one special token.
enum TokenSetting {
    /// The key is absent: use the model's own default.
    Absent,
    /// `"bos_token": null`: there is none.
    Null,
    Token(String),
}

/// The JSON side files next to a tokenizer file.
struct SideConfig {
    /// (file, parsed JSON) for tokenizer_config.json then special_tokens_map.json, where present.
    files: Vec<(PathBuf, Value)>,
    /// Their bytes, for the fingerprint.
    raw: Vec<u8>,
}

impl SideConfig {
    fn read(dir: &Path) -> Result<SideConfig> {
        let mut files = Vec::new();
        let mut raw = Vec::new();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let value: Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: invalid JSON", path.display()))?;
            raw.extend_from_slice(&bytes);
            files.push((path, value));
        }
        Ok(SideConfig { files, raw })
    }

    fn token(&self, key: &str) -> Result<TokenSetting> {
        for (path, value) in &self.files {
            match value.get(key) {
                None => continue,
                Some(Value::Null) => return Ok(TokenSetting::Null),
                Some(Value::String(s)) => return Ok(TokenSetting::Token(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => return Ok(TokenSetting::Token(s.clone())),
                    _ => bail!(
                        "{}: `{key}` is an object without a string \"content\"",
                        path.display()
                    ),
                },
                Some(other) => bail!(
                    "{}: `{key}` must be a string, an object or null, found {other}",
                    path.display()
                ),
            }
        }
        Ok(TokenSetting::Absent)
    }

    /// A boolean from tokenizer_config.json (`add_bos_token`...).
    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        for (path, value) in &self.files {
            match value.get(key) {
                None | Some(Value::Null) => continue,
                Some(Value::Bool(b)) => return Ok(*b),
                Some(other) => bail!(
                    "{}: `{key}` must be true or false, found {other}",
                    path.display()
                ),
            }
        }
        Ok(default)
    }

    /// tokenizer_config.json `added_tokens_decoder`: {"92543": {"content": "<|im_start|>", ...}}.
    fn added_tokens(&self) -> Result<Vec<AddedToken>> {
        let mut out = Vec::new();
        for (path, value) in &self.files {
            let Some(decoder) = value.get("added_tokens_decoder") else {
                continue;
            };
            let Value::Object(entries) = decoder else {
                bail!(
                    "{}: `added_tokens_decoder` must be an object",
                    path.display()
                );
            };
            for (key, entry) in entries {
                let id: u32 = key.parse().with_context(|| {
                    format!(
                        "{}: added_tokens_decoder key {key:?} is not a token id",
                        path.display()
                    )
                })?;
                let content = match entry.get("content") {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    _ => bail!(
                        "{}: added_tokens_decoder[{key:?}] has no non-empty string \"content\"",
                        path.display()
                    ),
                };
                let flag = |name: &str, default: bool| -> Result<bool> {
                    match entry.get(name) {
                        None | Some(Value::Null) => Ok(default),
                        Some(Value::Bool(b)) => Ok(*b),
                        Some(other) => bail!(
                            "{}: added_tokens_decoder[{key:?}].{name} must be true or false, found {other}",
                            path.display()
                        ),
                    }
                };
                out.push(AddedToken {
                    content,
                    id,
                    lstrip: flag("lstrip", false)?,
                    rstrip: flag("rstrip", false)?,
                    special: flag("special", false)?,
                });
            }
            break;
        }
        Ok(out)
    }
}

impl Tokenizer {
    /// Load from a `tokenizer.json` / `tokenizer.model` file or a directory holding one.
    pub fn from_path(path: &Path) -> Result<Tokenizer> {
        let file = resolve_file(path)?;
        let bytes = std::fs::read(&file)
            .with_context(|| format!("reading tokenizer {}", file.display()))?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let side = SideConfig::read(dir)?;
        let mut hasher = Sha256::new();
        hasher.update(&bytes);
        hasher.update(&side.raw);
        let fingerprint = hex::encode(&hasher.finalize()[..16]);
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let backend = if name.ends_with(".json") {
            let tk = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
                anyhow::anyhow!("{}: not a valid tokenizer.json: {e}", file.display())
            })?;
            Backend::Hf(Box::new(tk))
        } else if name.ends_with(".model") {
            let model = SentencePieceModel::from_bytes(&bytes, &file)?;
            let added = side.added_tokens()?;
            Backend::SentencePiece(Box::new(SpBackend {
                model,
                added: AddedTokens::new(added),
                add_bos: side.flag("add_bos_token", true)?,
                add_eos: side.flag("add_eos_token", false)?,
            }))
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
            special_ids: HashSet::new(),
            fingerprint,
            source: file.clone(),
        };
        let (model_bos, model_eos) = match &t.backend {
            Backend::SentencePiece(sp) => (sp.model.bos_id(), sp.model.eos_id()),
            Backend::Hf(_) => (
                t.first_known(&["<s>", "<|begin_of_text|>"]),
                t.first_known(&["</s>", "<|end_of_text|>", "<|endoftext|>"]),
            ),
        };
        t.bos = t.resolve_setting(&side, "bos_token", model_bos, dir)?;
        t.eos = t.resolve_setting(&side, "eos_token", model_eos, dir)?;
        t.special_ids = t.collect_special_ids();
        Ok(t)
    }

    fn resolve_setting(
        &self,
        side: &SideConfig,
        key: &str,
        default: Option<u32>,
        dir: &Path,
    ) -> Result<Option<u32>> {
        Ok(match side.token(key)? {
            TokenSetting::Absent => default,
            TokenSetting::Null => None,
            TokenSetting::Token(s) => Some(self.token_to_id(&s).with_context(|| {
                format!(
                    "{}: {key} {s:?} is not in the vocabulary of {}",
                    dir.join("tokenizer_config.json").display(),
                    self.source.display()
                )
            })?),
        })
    }

    /// Wrap an in-memory Hugging Face tokenizer (tests, the demo generator).
    pub fn from_hf(tk: tokenizers::Tokenizer, bos: Option<&str>, eos: Option<&str>) -> Tokenizer {
        let json = tk.to_string(false).unwrap_or_default();
        let fingerprint = hex::encode(&Sha256::digest(json.as_bytes())[..16]);
        let mut t = Tokenizer {
            backend: Backend::Hf(Box::new(tk)),
            bos: None,
            eos: None,
            special_ids: HashSet::new(),
            fingerprint,
            source: PathBuf::from("<memory>"),
        };
        t.bos = bos.and_then(|s| t.token_to_id(s));
        t.eos = eos.and_then(|s| t.token_to_id(s));
        t.special_ids = t.collect_special_ids();
        t
    }

    fn collect_special_ids(&self) -> HashSet<u32> {
        let mut ids: HashSet<u32> = self.bos.into_iter().chain(self.eos).collect();
        match &self.backend {
            Backend::Hf(tk) => ids.extend(
                tk.get_added_tokens_decoder()
                    .iter()
                    .filter(|(_, t)| t.special)
                    .map(|(&id, _)| id),
            ),
            Backend::SentencePiece(sp) => {
                ids.extend(sp.added.tokens.iter().filter(|t| t.special).map(|t| t.id));
                ids.extend((0..sp.model.len() as u32).filter(|&id| {
                    matches!(
                        sp.model.kind(id),
                        Some(PieceKind::Control | PieceKind::Unknown)
                    )
                }));
            }
        }
        ids
    }

    fn first_known(&self, names: &[&str]) -> Option<u32> {
        names.iter().find_map(|n| self.token_to_id(n))
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's own post-processor runs
    /// (e.g. a BOS for Llama / InternLM2); XTuner encodes with it off and adds BOS itself.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf(tk) => Ok(tk
                .encode(text, add_special_tokens)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()),
            Backend::SentencePiece(sp) => {
                let mut ids = Vec::with_capacity(text.len() / 3 + 2);
                if add_special_tokens && sp.add_bos {
                    ids.extend(self.bos);
                }
                sp.encode(text, &mut ids);
                if add_special_tokens && sp.add_eos {
                    ids.extend(self.eos);
                }
                Ok(ids)
            }
        }
    }

    /// Text of `ids`; `skip_special_tokens` drops special tokens (BOS/EOS, chat markers).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        match &self.backend {
            Backend::Hf(tk) => tk
                .decode(ids, skip_special_tokens)
                .map_err(|e| anyhow::anyhow!("decoding: {e}")),
            Backend::SentencePiece(sp) => {
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= sp.vocab_size()) {
                    bail!(
                        "decoding: token id {bad} is outside the vocabulary ({} tokens)",
                        sp.vocab_size()
                    );
                }
                let mut out = String::new();
                sp.decode(ids, skip_special_tokens, &mut out);
                Ok(out)
            }
        }
    }

    /// Incremental decoding for streaming chat output: feed ids one at a time.
    pub fn decode_stream(&self) -> DecodeStream<'_> {
        DecodeStream {
            tokenizer: self,
            window: Vec::new(),
            prefix: String::new(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf(tk) => tk.token_to_id(token),
            Backend::SentencePiece(sp) => sp
                .added
                .by_content
                .get(token)
                .map(|&i| sp.added.tokens[i].id)
                .or_else(|| sp.model.piece_to_id(token)),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(tk) => tk.id_to_token(id),
            Backend::SentencePiece(sp) => match sp.added.by_id.get(&id) {
                Some(&i) => Some(sp.added.tokens[i].content.clone()),
                None => sp.model.piece(id).map(String::from),
            },
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `id` is a special token (BOS/EOS/UNK/control, or an added token marked special).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(tk) => tk.get_vocab_size(true),
            Backend::SentencePiece(sp) => sp.vocab_size(),
        }
    }

    /// A short hash of the tokenizer file's bytes and of the tokenizer_config.json /
    /// special_tokens_map.json beside it (dataset cache keys, checkpoint checks).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// Streaming decoder from [`Tokenizer::decode_stream`]: `step` returns the text that the new
/// id completes. It decodes a small window of recent ids and emits what the new id added, so
/// a character split over several byte tokens appears once complete and SentencePiece's
/// leading-space rule applies as in a full `decode` (special tokens are kept; callers that hide
/// them check [`Tokenizer::is_special`] first).
pub struct DecodeStream<'t> {
    tokenizer: &'t Tokenizer,
    /// Ids decoded for context: the last emitted id plus those not yet emitted.
    window: Vec<u32>,
    /// The decoded text of `window` before the newest id.
    prefix: String,
}

impl DecodeStream<'_> {
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.window.push(id);
        let text = self.tokenizer.decode(&self.window, false)?;
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for its remaining bytes.
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new_text = match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.to_string(),
            // The context changed how earlier ids decode (should not happen): emit the
            // difference after the longest common prefix.
            None => {
                let common = text
                    .char_indices()
                    .zip(self.prefix.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, a), _)| i + a.len_utf8());
                text[common..].to_string()
            }
        };
        // Keep the newest id as context for the next one (its trailing bytes / leading space).
        self.window.drain(..self.window.len() - 1);
        self.prefix = self.tokenizer.decode(&self.window, false)?;
        Ok(Some(new_text))
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
