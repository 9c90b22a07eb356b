//! Dataset files -> `Record`s.
//!
//! A file is a JSON array or JSON Lines (detected from its first character). The record format
//! is given per file or detected from the first record's keys. Each format is mapped the way
//! XTuner's dataset map function for it does (`openai_map_fn`, `alpaca_map_fn`,
//! `pretrain_map_fn`, `llava_map_fn`; the native `conversation` passes through), except that
//! LLaVA input errors XTuner would skip or crash on are reported. Every error names
//! `file:line` (the JSON Lines line, or the line where an array element starts).

use super::{Record, Turn, IMAGE_TOKEN};
use crate::config::load::{did_you_mean, FORMATS};
use crate::config::DataFile;
use anyhow::{anyhow, bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};
use std::fmt;
use std::path::PathBuf;

/// A record format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenAI `{"messages": [{"role", "content", "loss"?}]}`.
    Messages,
    /// XTuner's native `{"conversation": [{"system"?, "input", "output"}]}`.
    Conversation,
    /// `{"instruction", "input", "output"}`.
    Alpaca,
    /// `{"text"}` for pretraining.
    Text,
    /// `{"image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`.
    Llava,
}

impl Format {
    /// The config name (`format = "..."` in `[[data.files]]`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Messages => "messages",
            Format::Conversation => "conversation",
            Format::Alpaca => "alpaca",
            Format::Text => "text",
            Format::Llava => "llava",
        }
    }

    /// The format named in a config; `None` for "auto".
    pub fn from_name(name: &str) -> Result<Option<Format>> {
        Ok(Some(match name {
            "auto" => return Ok(None),
            "messages" => Format::Messages,
            "conversation" => Format::Conversation,
            "alpaca" => Format::Alpaca,
            "text" => Format::Text,
            "llava" => Format::Llava,
            other => {
                let mut msg = format!(
                    "unknown data format `{other}`; valid formats: {}",
                    FORMATS.join(", ")
                );
                if let Some(s) = did_you_mean(other, FORMATS) {
                    msg.push_str(&format!(" (did you mean `{s}`?)"));
                }
                bail!(msg)
            }
        }))
    }

    /// The format a record's keys announce, if any.
    pub fn detect(record: &Map<String, Value>) -> Option<Format> {
        // LLaVA first: its records may also carry unrelated keys such as "id".
        [
            ("conversations", Format::Llava),
            ("messages", Format::Messages),
            ("conversation", Format::Conversation),
            ("instruction", Format::Alpaca),
            ("text", Format::Text),
        ]
        .into_iter()
        .find(|(key, _)| record.contains_key(*key))
        .map(|(_, f)| f)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What was read from one file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileReport {
    pub path: PathBuf,
    pub format: Format,
    /// Records in the file.
    pub records: usize,
    /// Records taken after applying the file's weight.
    pub used: usize,
}

/// What `read_all` read, per file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReadReport {
    pub files: Vec<FileReport>,
}

impl ReadReport {
    /// Records taken from all files (after weights).
    pub fn used(&self) -> usize {
        self.files.iter().map(|f| f.used).sum()
    }
}

impl fmt::Display for ReadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, file) in self.files.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}: {} records ({}), {} used",
                file.path.display(),
                file.records,
                file.format,
                file.used
            )?;
        }
        Ok(())
    }
}

/// Where a record came from: its file (an index into the files read) and the line it starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub file: usize,
    pub line: usize,
}

impl Origin {
    /// `path:line` for messages.
    pub fn describe(&self, files: &[DataFile]) -> String {
        match files.get(self.file) {
            Some(f) => format!("{}:{}", f.path.display(), self.line),
            None => format!("file #{}:{}", self.file, self.line),
        }
    }
}

/// Read one dataset file into records (its weight is applied by `read_all`).
pub fn read_file(file: &DataFile) -> Result<Vec<Record>> {
    read_file_with_format(file).map(|(records, _)| records.into_iter().map(|(_, r)| r).collect())
}

/// Read every file and apply its weight: the integer part repeats the file, the fractional part
/// adds that share of its records, a subset drawn from `seed` (the same seed, the same subset).
pub fn read_all(files: &[DataFile], seed: u64) -> Result<(Vec<Record>, ReadReport)> {
    let (located, report) = read_all_located(files, seed)?;
    Ok((located.into_iter().map(|(r, _)| r).collect(), report))
}

/// [`read_all`] with each record's [`Origin`] (for errors found after parsing, e.g. a missing
/// image).
pub fn read_all_located(
    files: &[DataFile],
    seed: u64,
) -> Result<(Vec<(Record, Origin)>, ReadReport)> {
    let mut all = Vec::new();
    let mut report = ReadReport::default();
    for (file_index, file) in files.iter().enumerate() {
        let w = file.weight;
        if !(w > 0.0 && w.is_finite()) {
            bail!("{}: weight must be > 0, got {w}", file.path.display());
        }
        let (records, format) = read_file_with_format(file)?;
        let records: Vec<(Record, Origin)> = records
            .into_iter()
            .map(|(line, r)| {
                let origin = Origin {
                    file: file_index,
                    line,
                };
                (r, origin)
            })
            .collect();
        let before = all.len();
        let repeats = w.trunc() as usize;
        for _ in 0..repeats {
            all.extend(records.iter().cloned());
        }
        let extra = ((w - w.trunc()) * records.len() as f64).round() as usize;
        if extra > 0 {
            // A per-file stream, so one file's subset does not depend on the files before it.
            let stream = seed ^ (file_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut rng = ChaCha8Rng::seed_from_u64(stream);
            let mut picked = rand::seq::index::sample(&mut rng, records.len(), extra).into_vec();
            picked.sort_unstable();
            all.extend(picked.into_iter().map(|i| records[i].clone()));
        }
        report.files.push(FileReport {
            path: file.path.clone(),
            format,
            records: records.len(),
            used: all.len() - before,
        });
    }
    Ok((all, report))
}

/// The records of a file with the line each starts on, and the file's format.
fn read_file_with_format(file: &DataFile) -> Result<(Vec<(usize, Record)>, Format)> {
    let path = file.path.display().to_string();
    let forced = Format::from_name(&file.format).with_context(|| format!("{path}: `format`"))?;
    let text = std::fs::read_to_string(&file.path)
        .with_context(|| format!("cannot read data file {path}"))?;
    let values = split_records(&text, &path)?;
    let Some((first_line, first)) = values.first() else {
        bail!("no records in {path}");
    };
    let format = match forced {
        Some(f) => f,
        None => {
            let obj = as_object(first).map_err(|m| located(&path, *first_line, m))?;
            Format::detect(obj).ok_or_else(|| {
                located(
                    &path,
                    *first_line,
                    format!(
                        "cannot detect the data format from the keys of the first record ({}); \
                         expected `messages` (OpenAI), `conversation` (XTuner), `instruction` + \
                         `output` (alpaca), `text` (pretraining) or `conversations` (LLaVA), \
                         or set `format` for this file",
                        describe_keys(obj)
                    ),
                )
            })?
        }
    };
    let records = values
        .iter()
        .map(|(line, v)| {
            parse_record(v, format)
                .map(|r| (*line, r))
                .map_err(|m| located(&path, *line, m))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((records, format))
}

fn located(path: &str, line: usize, msg: impl fmt::Display) -> anyhow::Error {
    anyhow!("{path}:{line}: {msg}")
}

fn describe_keys(obj: &Map<String, Value>) -> String {
    if obj.is_empty() {
        "no keys".into()
    } else {
        let keys: Vec<String> = obj.keys().map(|k| format!("`{k}`")).collect();
        format!("keys seen: {}", keys.join(", "))
    }
}

/// The records of a file with the 1-based line each starts on.
fn split_records(text: &str, path: &str) -> Result<Vec<(usize, Value)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('[') {
        return split_array(text, path);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            let mut msg = format!(
                "malformed JSON at column {}: {}",
                e.column(),
                strip_position(&e)
            );
            if out.is_empty() && serde_json::from_str::<Value>(text).is_ok() {
                msg.push_str(
                    " (the file is one JSON value over several lines; JSON Lines needs one \
                     record per line, or make it a JSON array of records)",
                );
            }
            located(path, i + 1, msg)
        })?;
        out.push((i + 1, value));
    }
    Ok(out)
}

/// A JSON array file: parsed whole (so syntax errors get serde's exact line), then scanned for
/// the line where each top-level element starts.
fn split_array(text: &str, path: &str) -> Result<Vec<(usize, Value)>> {
    let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        located(
            path,
            e.line(),
            format!(
                "malformed JSON at column {}: {}",
                e.column(),
                strip_position(&e)
            ),
        )
    })?;
    let starts = array_element_lines(text);
    debug_assert_eq!(starts.len(), values.len());
    Ok(starts.into_iter().zip(values).collect())
}

/// 1-based lines where the elements of the top-level array in (valid JSON) `text` start.
fn array_element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let mut line = 1;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // True right after the outer `[` or a top-level `,`: the next non-space byte starts an element.
    let mut expect_element = false;
    for b in text.bytes() {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if expect_element && !(depth == 1 && b == b']') {
            lines.push(line);
            expect_element = false;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expect_element = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_element = true,
            _ => {}
        }
    }
    lines
}

/// serde_json's message without its " at line L column C" tail (the caller reports the place).
fn strip_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(pos) => msg[..pos].to_string(),
        None => msg,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn as_object(v: &Value) -> Result<&Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("a record must be a JSON object, got {}", type_name(v)))
}

/// `obj[key]` as a string; missing or null is `None`. `at` names the object in messages.
fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!(
            "{at}`{key}` must be a string, got {}",
            type_name(other)
        )),
    }
}

fn req_str<'a>(obj: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        None => Err(format!("{at}missing `{key}`")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "{at}`{key}` must be a string, got {}",
            type_name(other)
        )),
    }
}

fn req_array<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Vec<Value>, String> {
    match obj.get(key) {
        None => Err(format!("missing `{key}`")),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(format!(
            "`{key}` must be an array, got {}",
            type_name(other)
        )),
    }
}

fn item_object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{at}must be an object, got {}", type_name(v)))
}

/// A loss flag: booleans, or the strings "true"/"false" (XTuner compares `str(loss).lower()`).
fn loss_flag(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<bool>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => Err(format!("{at}`{key}` must be true or false, got {other}")),
    }
}

fn non_empty(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(String::from)
}

/// One record in a known format. Errors are messages without the location.
fn parse_record(v: &Value, format: Format) -> Result<Record, String> {
    let obj = as_object(v)?;
    match format {
        Format::Messages => parse_messages(obj),
        Format::Conversation => parse_conversation(obj),
        Format::Alpaca => parse_alpaca(obj),
        Format::Text => Ok(Record::Text(req_str(obj, "text", "")?.trim().to_string())),
        Format::Llava => parse_llava(obj),
    }
}

/// XTuner's `openai_map_fn`: leading assistant messages are skipped, consecutive user messages
/// are concatenated, a system message applies to the next answer's turn, user messages after
/// the last answer are dropped.
fn parse_messages(obj: &Map<String, Value>) -> Result<Record, String> {
    let messages = req_array(obj, "messages")?;
    let mut turns = Vec::new();
    let mut system: Option<String> = None;
    let mut input = String::new();
    let mut started = false;
    for (j, m) in messages.iter().enumerate() {
        let at = format!("messages[{j}]: ");
        let m = item_object(m, &at)?;
        let role = req_str(m, "role", &at)?;
        let content = req_str(m, "content", &at)?;
        if role == "assistant" && !started {
            continue;
        }
        started = true;
        match role {
            "system" => system = non_empty(Some(content)),
            "user" => input.push_str(content),
            "assistant" => turns.push(Turn {
                system: system.take(),
                input: std::mem::take(&mut input),
                output: content.to_string(),
                loss: loss_flag(m, "loss", &at)?.unwrap_or(true),
            }),
            other => {
                return Err(format!(
                    "{at}unknown role `{other}` (expected system, user or assistant)"
                ))
            }
        }
    }
    Ok(Record::Chat { turns, image: None })
}

/// XTuner's native format; `input: null` reads as "" and `output_with_loss: false` masks a turn.
fn parse_conversation(obj: &Map<String, Value>) -> Result<Record, String> {
    let items = req_array(obj, "conversation")?;
    let mut turns = Vec::with_capacity(items.len());
    for (j, item) in items.iter().enumerate() {
        let at = format!("conversation[{j}]: ");
        let t = item_object(item, &at)?;
        turns.push(Turn {
            system: non_empty(opt_str(t, "system", &at)?),
            input: opt_str(t, "input", &at)?.unwrap_or_default().to_string(),
            output: req_str(t, "output", &at)?.to_string(),
            loss: loss_flag(t, "output_with_loss", &at)?.unwrap_or(true),
        });
    }
    Ok(Record::Chat { turns, image: None })
}

/// XTuner's `alpaca_map_fn`: input = instruction + "\n" + input; `<nooutput>` makes no turn.
/// A missing `input` reads as "" (XTuner would fail on it).
fn parse_alpaca(obj: &Map<String, Value>) -> Result<Record, String> {
    let instruction = req_str(obj, "instruction", "")?;
    let input = opt_str(obj, "input", "")?.unwrap_or_default();
    let output = req_str(obj, "output", "")?;
    let turns = if output == "<nooutput>" {
        vec![]
    } else {
        vec![Turn {
            system: None,
            input: format!("{instruction}\n{input}"),
            output: output.to_string(),
            loss: true,
        }]
    };
    Ok(Record::Chat { turns, image: None })
}

/// XTuner's `llava_map_fn` (an `<image>` moves to the front of its message, followed by "\n";
/// human messages before an answer are concatenated), with checks XTuner lacks: the conversation
/// must open with a human turn, a turn holds at most one `<image>`, a record at most one (it has
/// one image; XTuner would splice the next sample's image into a second one), and `<image>`
/// needs `image`.
fn parse_llava(obj: &Map<String, Value>) -> Result<Record, String> {
    let image = non_empty(opt_str(obj, "image", "")?);
    let messages = req_array(obj, "conversations")?;
    let mut turns = Vec::new();
    let mut input = String::new();
    // The message that holds the record's `<image>`, once seen.
    let mut image_at: Option<usize> = None;
    for (j, m) in messages.iter().enumerate() {
        let at = format!("conversations[{j}]: ");
        let m = item_object(m, &at)?;
        let from = req_str(m, "from", &at)?;
        let value = req_str(m, "value", &at)?;
        match from {
            "human" => {
                if input.matches(IMAGE_TOKEN).count() + value.matches(IMAGE_TOKEN).count() > 1 {
                    return Err(format!(
                        "{at}more than one `{IMAGE_TOKEN}` in one turn (one image per turn)"
                    ));
                }
                if value.contains(IMAGE_TOKEN) {
                    if image.is_none() {
                        return Err(format!("{at}`{IMAGE_TOKEN}` in a record without `image`"));
                    }
                    if let Some(first) = image_at {
                        return Err(format!(
                            "{at}a second `{IMAGE_TOKEN}` (the first is in conversations[{first}]); \
                             a record has one image"
                        ));
                    }
                    image_at = Some(j);
                    let text = value.replace(IMAGE_TOKEN, "");
                    input.push_str(format!("{IMAGE_TOKEN}\n{}", text.trim()).trim());
                } else {
                    input.push_str(value);
                }
            }
            "gpt" if j == 0 => {
                return Err(format!(
                    "{at}the conversation starts with a gpt message; it must start with human"
                ))
            }
            "gpt" => turns.push(Turn {
                system: None,
                input: std::mem::take(&mut input),
                output: value.to_string(),
                loss: true,
            }),
            other => {
                return Err(format!(
                    "{at}unknown `from` value `{other}` (expected human or gpt)"
                ))
            }
        }
    }
    Ok(Record::Chat { turns, image })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_lines_follow_multiline_elements_and_strings() {
        let text = "[\n {\"a\": \"x,[{\\\"\"},\n\n  {\"b\":\n [1,2]}, 3\n]";
        assert_eq!(array_element_lines(text), vec![2, 4, 5]);
        assert_eq!(array_element_lines("[]"), Vec::<usize>::new());
        assert_eq!(array_element_lines("[ ]"), Vec::<usize>::new());
    }
}
