//! Reading a config: TOML text -> table -> `--set` overrides -> typed `Config` -> validation.
//! Every error names the file, the line where the key stands (or the `--set` that gave it),
//! the key and the offending value, with a "did you mean" for misspelt keys and names.

use super::Config;
use serde::Deserialize;
use std::fmt;
use std::path::Path;

/// A config problem located at a key of a file (or of a `--set` override).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    /// Dotted key path, e.g. `optim.lr`; empty for file-level problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}", self.file, l)?,
            None => write!(f, "{}", self.file)?,
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Load a config file and apply `key=value` overrides.
pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: None,
        key: String::new(),
        message: format!("cannot read config: {e}"),
    })?;
    load_str(&text, &file, overrides)
}

/// Load a config from text; `file` names it in errors.
pub fn load_str(text: &str, file: &str, overrides: &[String]) -> Result<Config, ConfigError> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map(|s| line_of_offset(text, s.start));
        ConfigError {
            file: file.into(),
            line,
            key: String::new(),
            message: format!("invalid TOML: {}", e.message()),
        }
    })?;
    let mut overridden = Vec::new();
    for ov in overrides {
        let key = apply_override(&mut table, ov).map_err(|message| ConfigError {
            file: "--set".into(),
            line: None,
            key: ov.split('=').next().unwrap_or("").trim().into(),
            message,
        })?;
        overridden.push(key);
    }
    let locate = |key: &str| -> (String, Option<usize>) {
        if overridden.iter().any(|k| k == key) {
            ("--set".into(), None)
        } else {
            (file.into(), locate_key(text, key))
        }
    };
    let value = toml::Value::Table(table);
    let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        // toml appends "\nin `path`" to its messages; the key is reported separately.
        let inner = e.into_inner().to_string();
        let inner = inner
            .split("\nin `")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let (key, message) = describe_serde_error(&path, &inner);
        let (f, line) = locate(&key);
        ConfigError {
            file: f,
            line,
            key,
            message,
        }
    })?;
    if let Err((key, message)) = validate(&cfg) {
        let (f, line) = locate(&key);
        return Err(ConfigError {
            file: f,
            line,
            key,
            message,
        });
    }
    Ok(cfg)
}

/// Apply `a.b.c=value` to the table. The value is parsed as a TOML value (numbers, booleans,
/// arrays, quoted strings) and falls back to a bare string. Returns the dotted key.
fn apply_override(table: &mut toml::Table, ov: &str) -> Result<String, String> {
    let (key, raw) = ov
        .split_once('=')
        .ok_or_else(|| format!("`--set {ov}` is not of the form section.key=value"))?;
    let key = key.trim();
    let raw = raw.trim();
    if key.is_empty() {
        return Err(format!("`--set {ov}` has an empty key"));
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("parsed key v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` in `{key}` is a value, not a section"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(key.to_string())
}

/// Turn serde's message into (key, message) with a suggestion for unknown fields.
fn describe_serde_error(path: &str, inner: &str) -> (String, String) {
    // serde: "unknown field `lerning_rate`, expected one of `lr`, `betas`" (or "expected `x`").
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let bad = rest.split('`').next().unwrap_or("").to_string();
        let expected: Vec<&str> = rest
            .split_once("expected")
            .map(|(_, e)| e.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default();
        // The path serde reports for an unknown field already ends with it.
        let key = if path.ends_with(&bad) || path == "." {
            path.trim_start_matches('.').to_string()
        } else {
            join_key(path, &bad)
        };
        let key = if key.is_empty() { bad.clone() } else { key };
        let mut msg = format!("unknown key `{bad}`");
        if let Some(s) = did_you_mean(&bad, &expected) {
            msg.push_str(&format!(" (did you mean `{s}`?)"));
        }
        if !expected.is_empty() {
            msg.push_str(&format!("; valid keys here: {}", expected.join(", ")));
        }
        return (key, msg);
    }
    let key = path.trim_start_matches('.').to_string();
    (key, inner.to_string())
}

fn join_key(prefix: &str, key: &str) -> String {
    let p = prefix.trim_start_matches('.');
    if p.is_empty() {
        key.to_string()
    } else {
        format!("{p}.{key}")
    }
}

/// Closest candidate by normalized Levenshtein similarity, if it is close enough.
pub fn did_you_mean<'a>(bad: &str, candidates: &[&'a str]) -> Option<&'a str> {
    // Names users bring from XTuner / transformers configs.
    const ALIASES: &[(&str, &str)] = &[
        ("learning_rate", "lr"),
        ("gradient_accumulation_steps", "grad_accum"),
        ("accumulative_counts", "grad_accum"),
        ("max_norm", "max_grad_norm"),
        ("lora_alpha", "alpha"),
        ("lora_dropout", "dropout"),
        ("prompt_template", "template"),
        ("max_epochs", "epochs"),
        ("save_total_limit", "keep_last"),
        ("evaluation_inputs", "inputs"),
    ];
    if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == bad) {
        if let Some(c) = candidates.iter().find(|c| *c == to) {
            return Some(c);
        }
    }
    candidates
        .iter()
        .map(|c| {
            (
                strsim::normalized_levenshtein(bad, c).max(strsim::jaro_winkler(bad, c) - 0.2),
                *c,
            )
        })
        .filter(|(s, _)| *s >= 0.5)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Line (1-based) where `section.key` is assigned in the TOML text, if it can be found.
/// Handles `[section]` headers, `[[section.array]]` headers and `key = ` lines.
fn locate_key(text: &str, dotted: &str) -> Option<usize> {
    let parts: Vec<&str> = dotted
        .split('.')
        .filter(|p| p.parse::<usize>().is_err())
        .collect();
    if parts.is_empty() {
        return None;
    }
    let (leaf, sections) = parts.split_last()?;
    let want_section = sections.join(".");
    let mut section = String::new();
    let mut fallback = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            section = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
            if section == dotted {
                fallback = fallback.or(Some(i + 1));
            }
            continue;
        }
        let Some((k, _)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim().trim_matches('"');
        if k == *leaf && section == want_section {
            return Some(i + 1);
        }
        if k == *leaf && fallback.is_none() && section.starts_with(&want_section) {
            fallback = Some(i + 1);
        }
    }
    fallback
}

/// Names accepted by string-valued keys. Kept here so errors can list them.
pub const TEMPLATES: &[&str] = &[
    "internlm2_chat",
    "qwen_chat",
    "llama3_chat",
    "llama2_chat",
    "plain",
];
pub const FORMATS: &[&str] = &[
    "auto",
    "messages",
    "conversation",
    "alpaca",
    "text",
    "llava",
];
pub const METHODS: &[&str] = &["lora", "qlora", "full"];
pub const PACK_MODES: &[&str] = &["split", "whole"];
pub const DTYPES: &[&str] = &["auto", "bf16", "f16", "f32"];
pub const ON_NAN: &[&str] = &["skip", "stop"];
pub const GRAD_DTYPES: &[&str] = &["auto", "f32"];
pub const DECAYS: &[&str] = &["cosine", "constant"];

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<(), (String, String)> {
    if allowed.contains(&value) {
        return Ok(());
    }
    let mut msg = format!("`{value}` is not one of {}", allowed.join(", "));
    if let Some(s) = did_you_mean(value, allowed) {
        msg.push_str(&format!(" (did you mean `{s}`?)"));
    }
    Err((key.to_string(), msg))
}

fn check(cond: bool, key: &str, msg: impl Into<String>) -> Result<(), (String, String)> {
    if cond {
        Ok(())
    } else {
        Err((key.to_string(), msg.into()))
    }
}

/// Semantic checks serde cannot express. Returns (key, message) of the first problem.
fn validate(c: &Config) -> Result<(), (String, String)> {
    check(
        !c.data.files.is_empty(),
        "data.files",
        "no data files: add [[data.files]] with a path",
    )?;
    for (i, f) in c.data.files.iter().enumerate() {
        one_of(&format!("data.files.{i}.format"), &f.format, FORMATS)?;
        check(
            f.weight > 0.0 && f.weight.is_finite(),
            &format!("data.files.{i}.weight"),
            format!("weight must be > 0, got {}", f.weight),
        )?;
    }
    one_of("data.template", &c.data.template, TEMPLATES)?;
    one_of("data.pack_mode", &c.data.pack_mode, PACK_MODES)?;
    check(
        c.data.max_length >= 8,
        "data.max_length",
        format!("{} is too small", c.data.max_length),
    )?;
    one_of("model.dtype", &c.model.dtype, DTYPES)?;
    one_of("train.method", &c.train.method, METHODS)?;
    one_of("train.on_nan", &c.train.on_nan, ON_NAN)?;
    one_of("optim.grad_dtype", &c.optim.grad_dtype, GRAD_DTYPES)?;
    if let Err(e) = super::gib_to_bytes(c.train.activation_budget_gib) {
        return Err(("train.activation_budget_gib".into(), e.to_string()));
    }
    check(
        c.train.batch_size >= 1,
        "train.batch_size",
        "must be at least 1",
    )?;
    check(
        c.train.grad_accum >= 1,
        "train.grad_accum",
        "must be at least 1",
    )?;
    check(
        c.train.epochs >= 1 || c.train.max_steps.is_some(),
        "train.epochs",
        "set epochs >= 1 or train.max_steps",
    )?;
    let d = c.train.device.as_str();
    check(
        d == "auto"
            || d == "cpu"
            || d == "cuda"
            || d.strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()),
        "train.device",
        format!("`{d}` is not auto, cpu, cuda or cuda:N"),
    )?;
    check(
        c.quant.bits == 4,
        "quant.bits",
        format!(
            "{}: only 4-bit (NF4) base weights are supported",
            c.quant.bits
        ),
    )?;
    one_of("quant.type", &c.quant.quant_type, &["nf4"])?;
    one_of(
        "quant.compute_dtype",
        &c.quant.compute_dtype,
        &["bf16", "f16", "f32"],
    )?;
    check(c.lora.r >= 1, "lora.r", "must be at least 1")?;
    check(
        (0.0..1.0).contains(&c.lora.dropout),
        "lora.dropout",
        format!("{} is not in [0, 1)", c.lora.dropout),
    )?;
    check(
        c.quant.bits == 4,
        "quant.bits",
        format!("only 4-bit is supported, got {}", c.quant.bits),
    )?;
    one_of("quant.type", &c.quant.quant_type, &["nf4"])?;
    one_of(
        "quant.compute_dtype",
        &c.quant.compute_dtype,
        &["bf16", "f16", "f32"],
    )?;
    check(
        c.optim.lr > 0.0 && c.optim.lr.is_finite(),
        "optim.lr",
        format!("{} must be > 0", c.optim.lr),
    )?;
    check(
        c.optim.betas.iter().all(|b| (0.0..1.0).contains(b)),
        "optim.betas",
        format!("{:?} must lie in [0, 1)", c.optim.betas),
    )?;
    check(
        c.optim.max_grad_norm >= 0.0,
        "optim.max_grad_norm",
        "must be >= 0",
    )?;
    check(
        (0.0..1.0).contains(&c.schedule.warmup_ratio),
        "schedule.warmup_ratio",
        "must lie in [0, 1)",
    )?;
    one_of("schedule.decay", &c.schedule.decay, DECAYS)?;
    check(
        c.parallel.sequence_parallel_size >= 1,
        "parallel.sequence_parallel_size",
        "must be at least 1",
    )?;
    check(
        c.parallel.zero_stage == 0 || c.parallel.zero_stage == 2,
        "parallel.zero_stage",
        format!("{} is not 0 or 2", c.parallel.zero_stage),
    )?;
    check(
        c.parallel.heartbeat_timeout_s > 0.0,
        "parallel.heartbeat_timeout_s",
        format!("must be positive, got {}", c.parallel.heartbeat_timeout_s),
    )?;
    check(
        c.parallel.collective_timeout_s > 0.0,
        "parallel.collective_timeout_s",
        format!("must be positive, got {}", c.parallel.collective_timeout_s),
    )?;
    check(
        c.log.every_steps >= 1,
        "log.every_steps",
        "must be at least 1",
    )?;
    if let Some(l) = &c.llava {
        validate_llava(c, l)?;
    }
    Ok(())
}

/// `[llava]` against the rest of the config.
fn validate_llava(c: &Config, l: &super::LlavaConfig) -> Result<(), (String, String)> {
    one_of("llava.stage", &l.stage, &["pretrain", "finetune"])?;
    check(
        !c.data.pack,
        "data.pack",
        "LLaVA samples are not packed (as in XTuner's LLaVA configs): set data.pack = false",
    )?;
    check(
        c.parallel.sequence_parallel_size == 1,
        "parallel.sequence_parallel_size",
        "sequence parallelism is not supported for LLaVA; use 1",
    )?;
    check(
        l.num_workers >= 1,
        "llava.num_workers",
        "must be at least 1",
    )?;
    check(l.prefetch >= 1, "llava.prefetch", "must be at least 1")?;
    if l.is_pretrain() {
        check(
            l.vision_lora.is_none(),
            "llava.vision_lora",
            "the vision tower is frozen in the pretrain stage; move [llava.vision_lora] to the finetune config",
        )?;
        check(
            l.pretrain_checkpoint.is_none(),
            "llava.pretrain_checkpoint",
            "the pretrain stage starts from a fresh projector; set it in the finetune config",
        )?;
    } else {
        check(
            l.pretrain_checkpoint.is_some(),
            "llava.pretrain_checkpoint",
            "the finetune stage starts from the pretrain stage's projector: set the pretrain checkpoint (or its work dir)",
        )?;
        check(
            !l.llm_4bit,
            "llava.llm_4bit",
            "applies to the pretrain stage; for a 4-bit LLM in finetune use train.method = \"qlora\"",
        )?;
    }
    if let Some(v) = &l.vision_lora {
        check(v.r >= 1, "llava.vision_lora.r", "must be at least 1")?;
        check(
            (0.0..1.0).contains(&v.dropout),
            "llava.vision_lora.dropout",
            format!("{} is not in [0, 1)", v.dropout),
        )?;
        for (i, t) in v.target_modules.iter().enumerate() {
            one_of(
                &format!("llava.vision_lora.target_modules.{i}"),
                t,
                &crate::model::vision::VISION_LINEARS,
            )?;
        }
    }
    Ok(())
}

/// Serialize a config back to TOML (used when a checkpoint records its config).
pub fn to_toml(c: &Config) -> String {
    toml::to_string_pretty(c).expect("config serializes")
}

impl Config {
    pub fn to_toml(&self) -> String {
        to_toml(self)
    }

    /// Parse a config's own serialized form (a checkpoint's config.toml).
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        Ok(Config::deserialize(toml::Value::Table(text.parse()?))?)
    }
}
