//! SentencePiece `tokenizer.model` without Python or protoc: the `ModelProto` messages we need,
//! declared by hand for prost, plus BPE (Llama, InternLM2) and Unigram encoding and decoding
//! that follow the reference library (normalizer.cc, bpe_model.cc, unigram_model.cc,
//! sentencepiece_processor.cc) exactly for the identity normalization those models use.

use anyhow::{bail, Context, Result};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

/// The meta-space SentencePiece writes for ' '.
const SPACE_SYMBOL: &str = "\u{2581}";

/// `ModelProto` (sentencepiece_model.proto); fields we do not use are skipped by prost.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<SentencePieceProto>,
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SentencePieceProto {
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// `PieceType` as its wire number (NORMAL when absent).
    #[prost(int32, optional, tag = "3")]
    pub r#type: Option<i32>,
}

/// `TrainerSpec`: the fields that change encoding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TrainerSpec {
    /// 1 UNIGRAM (the default), 2 BPE, 3 WORD, 4 CHAR.
    #[prost(int32, optional, tag = "3")]
    pub model_type: Option<i32>,
    #[prost(bool, optional, tag = "24")]
    pub treat_whitespace_as_suffix: Option<bool>,
    #[prost(bool, optional, tag = "35")]
    pub byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    pub unk_id: Option<i32>,
    #[prost(int32, optional, tag = "41")]
    pub bos_id: Option<i32>,
    #[prost(int32, optional, tag = "42")]
    pub eos_id: Option<i32>,
    #[prost(string, optional, tag = "44")]
    pub unk_surface: Option<String>,
}

/// `NormalizerSpec`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    pub add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    pub remove_extra_whitespaces: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    pub escape_whitespaces: Option<bool>,
}

/// `ModelProto.SentencePiece.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceKind {
    fn from_wire(v: i32) -> Option<PieceKind> {
        Some(match v {
            1 => PieceKind::Normal,
            2 => PieceKind::Unknown,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            5 => PieceKind::Unused,
            6 => PieceKind::Byte,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Bpe,
    Unigram,
}

struct Piece {
    text: String,
    score: f32,
    kind: PieceKind,
}

/// A loaded SentencePiece model.
pub struct SentencePieceModel {
    pieces: Vec<Piece>,
    model_type: ModelType,
    /// NORMAL, USER_DEFINED and UNUSED pieces: what merges / the lattice may produce.
    vocab: HashMap<String, u32>,
    /// CONTROL, UNKNOWN and BYTE pieces: looked up first, never produced from text.
    reserved: HashMap<String, u32>,
    /// User-defined pieces grouped by their first byte, longest first (prefix matching).
    user_defined_by_first_byte: Vec<Vec<(String, u32)>>,
    byte_ids: [Option<u32>; 256],
    unk_id: u32,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    byte_fallback: bool,
    unk_surface: String,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    treat_whitespace_as_suffix: bool,
    /// Longest vocab piece in bytes (bounds the Unigram lattice).
    max_piece_bytes: usize,
    /// Score of the best NORMAL piece (Unigram's bonus for user-defined pieces).
    max_normal_score: f32,
    /// Score given to an unknown character in the Unigram lattice.
    unk_score: f32,
}

impl SentencePieceModel {
    /// Parse a serialized `ModelProto`; `file` names the source in errors.
    pub fn from_bytes(bytes: &[u8], file: &Path) -> Result<SentencePieceModel> {
        let proto: ModelProto = prost::Message::decode(bytes).with_context(|| {
            format!(
                "{}: not a valid SentencePiece tokenizer.model (protobuf decode failed)",
                file.display()
            )
        })?;
        if proto.pieces.is_empty() {
            bail!(
                "{}: not a valid SentencePiece tokenizer.model (no pieces)",
                file.display()
            );
        }
        let trainer = proto.trainer_spec.unwrap_or_default();
        let normalizer = proto.normalizer_spec.unwrap_or_default();
        let model_type = match trainer.model_type.unwrap_or(1) {
            1 => ModelType::Unigram,
            2 => ModelType::Bpe,
            3 => bail!(
                "{}: SentencePiece model_type WORD is not supported (BPE and Unigram are)",
                file.display()
            ),
            4 => bail!(
                "{}: SentencePiece model_type CHAR is not supported (BPE and Unigram are)",
                file.display()
            ),
            other => bail!(
                "{}: unknown SentencePiece model_type {other}",
                file.display()
            ),
        };
        if normalizer
            .precompiled_charsmap
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            bail!(
                "{}: SentencePiece normalization rule {:?} is not supported (only \"identity\", as \
                 Llama and InternLM2 use)",
                file.display(),
                normalizer.name.unwrap_or_default()
            );
        }

        let mut pieces = Vec::with_capacity(proto.pieces.len());
        let mut vocab = HashMap::with_capacity(proto.pieces.len());
        let mut reserved = HashMap::new();
        let mut user_defined_by_first_byte: Vec<Vec<(String, u32)>> = vec![Vec::new(); 256];
        let mut byte_ids = [None; 256];
        let mut unk_id = None;
        let mut max_piece_bytes = 1;
        let mut min_normal_score = f32::MAX;
        // sentencepiece starts from FLT_MIN (the smallest positive float), not -FLT_MAX.
        let mut max_normal_score = f32::MIN_POSITIVE;
        for (i, p) in proto.pieces.into_iter().enumerate() {
            let id = i as u32;
            let text = p.piece.unwrap_or_default();
            let wire = p.r#type.unwrap_or(1);
            let kind = PieceKind::from_wire(wire).with_context(|| {
                format!(
                    "{}: piece {id} {text:?} has unknown type {wire}",
                    file.display()
                )
            })?;
            if text.is_empty() {
                bail!("{}: piece {id} is empty", file.display());
            }
            let score = p.score.unwrap_or(0.0);
            let table = match kind {
                PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused => &mut vocab,
                _ => &mut reserved,
            };
            if table.insert(text.clone(), id).is_some() {
                bail!("{}: piece {text:?} is defined twice", file.display());
            }
            match kind {
                PieceKind::Unknown => unk_id = Some(id),
                PieceKind::Byte => {
                    let byte = parse_byte_piece(&text).with_context(|| {
                        format!(
                            "{}: byte piece {id} is {text:?}, expected <0xXX>",
                            file.display()
                        )
                    })?;
                    byte_ids[byte as usize] = Some(id);
                }
                PieceKind::UserDefined => {
                    user_defined_by_first_byte[text.as_bytes()[0] as usize].push((text.clone(), id))
                }
                PieceKind::Normal => {
                    min_normal_score = min_normal_score.min(score);
                    max_normal_score = max_normal_score.max(score);
                }
                _ => {}
            }
            if kind != PieceKind::Byte {
                max_piece_bytes = max_piece_bytes.max(text.len());
            }
            pieces.push(Piece { text, score, kind });
        }
        for group in &mut user_defined_by_first_byte {
            group.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        }
        let unk_id = unk_id
            .with_context(|| format!("{}: the model has no UNKNOWN piece", file.display()))?;
        let byte_fallback = trainer.byte_fallback.unwrap_or(false);
        if byte_fallback && byte_ids.iter().any(Option::is_none) {
            bail!(
                "{}: byte_fallback is on but not all 256 <0xXX> pieces exist",
                file.display()
            );
        }
        let special_id = |v: Option<i32>, default: i32| -> Option<u32> {
            let v = v.unwrap_or(default);
            (v >= 0 && (v as usize) < pieces.len()).then_some(v as u32)
        };
        let bos_id = special_id(trainer.bos_id, 1);
        let eos_id = special_id(trainer.eos_id, 2);
        Ok(SentencePieceModel {
            model_type,
            vocab,
            reserved,
            user_defined_by_first_byte,
            byte_ids,
            unk_id,
            bos_id,
            eos_id,
            byte_fallback,
            unk_surface: trainer
                .unk_surface
                .unwrap_or_else(|| " \u{2047} ".to_string()),
            add_dummy_prefix: normalizer.add_dummy_prefix.unwrap_or(true),
            remove_extra_whitespaces: normalizer.remove_extra_whitespaces.unwrap_or(true),
            escape_whitespaces: normalizer.escape_whitespaces.unwrap_or(true),
            treat_whitespace_as_suffix: trainer.treat_whitespace_as_suffix.unwrap_or(false),
            max_piece_bytes,
            max_normal_score,
            unk_score: if min_normal_score == f32::MAX {
                -10.0
            } else {
                min_normal_score - 10.0
            },
            pieces,
        })
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    pub fn kind(&self, id: u32) -> Option<PieceKind> {
        self.pieces.get(id as usize).map(|p| p.kind)
    }

    /// The id of a piece (reserved pieces first, as `PieceToId` does); `None` if absent.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.reserved
            .get(piece)
            .or_else(|| self.vocab.get(piece))
            .copied()
    }

    /// `SentencePieceProcessor::Encode` of one text: normalize, segment, byte fallback.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let normalized = self.normalize(text);
        if normalized.is_empty() {
            return;
        }
        let mut segments: Vec<(&str, u32)> = Vec::new();
        match self.model_type {
            ModelType::Bpe => self.bpe_segments(&normalized, &mut segments),
            ModelType::Unigram => self.unigram_segments(&normalized, &mut segments),
        }
        for (piece, id) in segments {
            if id == self.unk_id && self.byte_fallback {
                // Unknown pieces decompose into their UTF-8 bytes.
                out.extend(piece.bytes().filter_map(|b| self.byte_ids[b as usize]));
            } else {
                out.push(id);
            }
        }
    }

    /// The length of the longest user-defined piece that `text` starts with.
    fn user_defined_prefix(&self, text: &str) -> Option<usize> {
        let first = *text.as_bytes().first()?;
        self.user_defined_by_first_byte[first as usize]
            .iter()
            .find(|(s, _)| text.starts_with(s.as_str()))
            .map(|(s, _)| s.len())
    }

    /// `Normalizer::Normalize` for the identity rule: user-defined pieces pass through whole,
    /// optional whitespace squeezing, the dummy prefix, and ' ' -> '▁'.
    fn normalize(&self, text: &str) -> String {
        let mut input = text;
        if self.remove_extra_whitespaces {
            input = input.trim_start_matches(' ');
        }
        let mut out = String::with_capacity(input.len() + input.len() / 2 + 3);
        if input.is_empty() {
            return out;
        }
        let space = if self.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
        if self.add_dummy_prefix && !self.treat_whitespace_as_suffix {
            out.push_str(space);
        }
        let mut is_prev_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let len = self
                .user_defined_prefix(input)
                .unwrap_or_else(|| first_char_len(input));
            let mut chunk = &input[..len];
            input = &input[len..];
            if is_prev_space {
                chunk = chunk.trim_start_matches(' ');
            }
            if !chunk.is_empty() {
                if self.escape_whitespaces {
                    for part in chunk.split_inclusive(' ') {
                        match part.strip_suffix(' ') {
                            Some(head) => {
                                out.push_str(head);
                                out.push_str(SPACE_SYMBOL);
                            }
                            None => out.push_str(part),
                        }
                    }
                } else {
                    out.push_str(chunk);
                }
                is_prev_space = chunk.ends_with(' ');
            }
            if !self.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        if self.add_dummy_prefix && self.treat_whitespace_as_suffix {
            out.push_str(space);
        }
        out
    }

    /// bpe_model.cc `Model::Encode`: start from characters (user-defined pieces frozen whole),
    /// repeatedly merge the adjacent pair whose merged piece scores highest (leftmost on ties).
    fn bpe_segments<'t>(&self, normalized: &'t str, out: &mut Vec<(&'t str, u32)>) {
        struct Symbol {
            start: usize,
            len: usize,
            prev: usize,
            next: usize,
            frozen: bool,
        }
        const NONE: usize = usize::MAX;
        let mut symbols: Vec<Symbol> = Vec::with_capacity(normalized.len());
        let mut pos = 0;
        while pos < normalized.len() {
            let rest = &normalized[pos..];
            let (len, frozen) = match self.user_defined_prefix(rest) {
                Some(len) => (len, true),
                None => (first_char_len(rest), false),
            };
            let index = symbols.len();
            symbols.push(Symbol {
                start: pos,
                len,
                prev: if index == 0 { NONE } else { index - 1 },
                next: if pos + len < normalized.len() {
                    index + 1
                } else {
                    NONE
                },
                frozen,
            });
            pos += len;
        }

        let mut agenda: BinaryHeap<Candidate> = BinaryHeap::with_capacity(symbols.len());
        // Merged pieces of UNUSED type are split back into what they were merged from.
        let mut unused_merges: HashMap<&'t str, (&'t str, &'t str)> = HashMap::new();
        let mut push_pair =
            |symbols: &[Symbol], agenda: &mut BinaryHeap<Candidate>, left: usize, right: usize| {
                if left == NONE || right == NONE || symbols[left].frozen || symbols[right].frozen {
                    return;
                }
                let (l, r) = (&symbols[left], &symbols[right]);
                let merged = &normalized[l.start..l.start + l.len + r.len];
                let Some(&id) = self.vocab.get(merged) else {
                    return;
                };
                let piece = &self.pieces[id as usize];
                agenda.push(Candidate {
                    score: piece.score,
                    left,
                    right,
                    len: merged.len(),
                });
                if piece.kind == PieceKind::Unused {
                    unused_merges.insert(
                        merged,
                        (
                            &normalized[l.start..l.start + l.len],
                            &normalized[r.start..r.start + r.len],
                        ),
                    );
                }
            };
        for i in 1..symbols.len() {
            push_pair(&symbols, &mut agenda, i - 1, i);
        }
        while let Some(top) = agenda.pop() {
            let (left, right) = (top.left, top.right);
            // Stale entries: one side was merged away or changed since this pair was queued.
            if symbols[left].len == 0
                || symbols[right].len == 0
                || symbols[left].len + symbols[right].len != top.len
            {
                continue;
            }
            symbols[left].len += symbols[right].len;
            symbols[right].len = 0;
            let next = symbols[right].next;
            symbols[left].next = next;
            if next != NONE {
                symbols[next].prev = left;
            }
            let prev = symbols[left].prev;
            push_pair(&symbols, &mut agenda, prev, left);
            push_pair(&symbols, &mut agenda, left, next);
        }

        let mut index = if symbols.is_empty() { NONE } else { 0 };
        while index != NONE {
            let s = &symbols[index];
            self.resegment(&normalized[s.start..s.start + s.len], &unused_merges, out);
            index = s.next;
        }
    }

    fn resegment<'t>(
        &self,
        piece: &'t str,
        unused_merges: &HashMap<&'t str, (&'t str, &'t str)>,
        out: &mut Vec<(&'t str, u32)>,
    ) {
        let id = self.piece_to_id(piece).unwrap_or(self.unk_id);
        if self.pieces[id as usize].kind == PieceKind::Unused {
            if let Some(&(l, r)) = unused_merges.get(piece) {
                self.resegment(l, unused_merges, out);
                self.resegment(r, unused_merges, out);
                return;
            }
        }
        out.push((piece, id));
    }

    /// unigram_model.cc `Model::EncodeOptimized`: Viterbi over every vocab piece starting at
    /// each character; a character no piece covers becomes UNK; runs of UNK are merged.
    fn unigram_segments<'t>(&self, normalized: &'t str, out: &mut Vec<(&'t str, u32)>) {
        #[derive(Clone, Copy)]
        struct Best {
            start: usize,
            id: u32,
            score: f32,
        }
        const UNSET: usize = usize::MAX;
        let n = normalized.len();
        // best[e]: the best path ending at byte e (only char boundaries are ever set).
        let mut best = vec![
            Best {
                start: UNSET,
                id: 0,
                score: 0.0
            };
            n + 1
        ];
        best[0].start = 0;
        let mut start = 0;
        while start < n {
            let base = best[start].score;
            let rest = &normalized[start..];
            let char_len = first_char_len(rest);
            let mut has_single_char = false;
            let mut relax = |end: usize, id: u32, score: f32| {
                let cand = base + score;
                let target = &mut best[end];
                if target.start == UNSET || cand > target.score {
                    *target = Best {
                        start,
                        id,
                        score: cand,
                    };
                }
            };
            // Every prefix of `rest` that ends on a character boundary, up to the longest piece.
            let prefix_lens = rest
                .char_indices()
                .map(|(i, _)| i)
                .skip(1)
                .chain(std::iter::once(rest.len()))
                .take_while(|&len| len <= self.max_piece_bytes);
            for len in prefix_lens {
                let Some(&id) = self.vocab.get(&rest[..len]) else {
                    continue;
                };
                let piece = &self.pieces[id as usize];
                let score = match piece.kind {
                    PieceKind::Unused => continue,
                    // User-defined pieces always win (sentencepiece's kEpsilon bonus rule).
                    PieceKind::UserDefined => len as f32 * self.max_normal_score - 1e-7,
                    _ => piece.score,
                };
                relax(start + len, id, score);
                has_single_char |= len == char_len;
            }
            if !has_single_char {
                relax(start + char_len, self.unk_id, self.unk_score);
            }
            start += char_len;
        }
        let first = out.len();
        let mut end = n;
        while end > 0 {
            let b = best[end];
            out.push((&normalized[b.start..end], b.id));
            end = b.start;
        }
        out[first..].reverse();
        // Merge runs of UNK into one piece (so decode copies the surface once).
        let mut merged: Vec<(&'t str, u32)> = Vec::with_capacity(out.len() - first);
        for &(piece, id) in &out[first..] {
            match merged.last_mut() {
                Some(last) if id == self.unk_id && last.1 == self.unk_id => {
                    let start = last.0.as_ptr() as usize - normalized.as_ptr() as usize;
                    last.0 = &normalized[start..start + last.0.len() + piece.len()];
                }
                _ => merged.push((piece, id)),
            }
        }
        out.truncate(first);
        out.extend(merged);
    }

    /// `SentencePieceProcessor::Decode` of ids: control pieces vanish, UNK shows its surface,
    /// byte pieces join into UTF-8 (U+FFFD per invalid byte), '▁' -> ' ', and the first
    /// piece loses the space the dummy prefix added (with remove_extra_whitespaces, all
    /// leading spaces up to the first visible text, as sentencepiece does).
    pub fn decode(&self, ids: &[u32], out: &mut String) {
        let strip_leading = (self.add_dummy_prefix || self.remove_extra_whitespaces)
            && !self.treat_whitespace_as_suffix;
        let mut at_start = strip_leading;
        let mut bytes: Vec<u8> = Vec::new();
        for &id in ids {
            let Some(piece) = self.pieces.get(id as usize) else {
                continue;
            };
            if piece.kind == PieceKind::Byte {
                bytes.extend(parse_byte_piece(&piece.text));
                at_start = false;
                continue;
            }
            push_lossy_utf8(&bytes, out);
            bytes.clear();
            match piece.kind {
                PieceKind::Control => {}
                PieceKind::Unknown => {
                    out.push_str(&self.unk_surface);
                    at_start = false;
                }
                _ => {
                    let mut text = piece.text.as_str();
                    if at_start {
                        text = text.strip_prefix(SPACE_SYMBOL).unwrap_or(text);
                        if self.remove_extra_whitespaces {
                            // Leading whitespace was squeezed away when encoding: drop all of
                            // it, across pieces, until something visible comes.
                            text = text.trim_start_matches(SPACE_SYMBOL);
                            at_start = text.is_empty();
                        } else {
                            at_start = false;
                        }
                    }
                    if self.escape_whitespaces {
                        out.push_str(&text.replace(SPACE_SYMBOL, " "));
                    } else {
                        out.push_str(text);
                    }
                }
            }
        }
        push_lossy_utf8(&bytes, out);
    }
}

/// A queued merge; the heap pops the highest score, then the leftmost pair.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

fn first_char_len(s: &str) -> usize {
    s.chars().next().map_or(0, char::len_utf8)
}

/// `<0xAB>` -> 0xAB.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Append `bytes` as UTF-8, one U+FFFD for each byte that does not start a valid character
/// (sentencepiece's rule; `String::from_utf8_lossy` would merge an incomplete sequence into one).
pub(crate) fn push_lossy_utf8(mut bytes: &[u8], out: &mut String) {
    while !bytes.is_empty() {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // Safe split: the prefix was just validated.
                out.push_str(std::str::from_utf8(&bytes[..valid]).unwrap_or_default());
                out.push('\u{FFFD}');
                bytes = &bytes[valid + 1..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_piece_parsing() {
        assert_eq!(parse_byte_piece("<0x0A>"), Some(10));
        assert_eq!(parse_byte_piece("<0xff>"), Some(255));
        assert_eq!(parse_byte_piece("<0x1>"), None);
        assert_eq!(parse_byte_piece("0x0A"), None);
    }

    #[test]
    fn lossy_utf8_replaces_each_bad_byte() {
        let mut s = String::new();
        push_lossy_utf8(&[0xE4, 0xBD, b'a', 0xE4, 0xBD, 0xA0], &mut s);
        assert_eq!(s, "\u{FFFD}\u{FFFD}a你");
    }

    #[test]
    fn candidate_order_prefers_score_then_left() {
        let mut heap = BinaryHeap::new();
        for (score, left) in [(1.0, 5), (2.0, 7), (2.0, 3), (-1.0, 0)] {
            heap.push(Candidate {
                score,
                left,
                right: left + 1,
                len: 2,
            });
        }
        let order: Vec<usize> = std::iter::from_fn(|| heap.pop().map(|c| c.left)).collect();
        assert_eq!(order, vec![3, 7, 5, 0]);
    }
}
