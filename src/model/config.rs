//! The decoder's shape, deserialized from a Hugging Face `config.json` (candle style).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// Decoder architectures ftrun trains. All are Llama-family pre-norm decoders; they differ in
/// weight names, the fused InternLM2 `wqkv` layout and Qwen2's q/k/v bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    InternLM2,
}

/// The fields the engine needs, normalized across architectures.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// `architectures[0]` as written in config.json (kept for export).
    pub hf_architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2; InternLM2 `bias: true`).
    pub qkv_bias: bool,
    /// o_proj / MLP carry a bias (InternLM2 `bias: true`); false for Llama and Qwen2.
    pub out_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `torch_dtype` of the stored weights ("bfloat16", "float16", "float32").
    pub torch_dtype: String,
    /// RoPE position scaling; None for plain RoPE (also for `dynamic`, which changes nothing
    /// within `max_position_embeddings`, the longest sequence ftrun trains on).
    pub rope_scaling: Option<RopeScaling>,
}

/// RoPE scaling the decoder must apply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: positions are divided by `factor` (transformers `linear`).
    Linear { factor: f64 },
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    /// Top level in transformers < 5; transformers 5 writes it into `rope_parameters`.
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    /// InternLM2's single bias switch for wqkv / wo / w1..w3.
    #[serde(default)]
    bias: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    torch_dtype: Option<String>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5: `{"rope_theta": ..., "rope_type": ..., "factor": ...}` (theta and the
    /// scaling that `rope_theta` / `rope_scaling` held before).
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    4096
}

/// `rope_scaling` of config.json: `{"type" | "rope_type": ..., "factor": ...}` or null.
fn parse_rope_scaling(v: &Option<serde_json::Value>) -> Result<Option<RopeScaling>> {
    let obj = match v {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Object(o)) => o,
        Some(other) => bail!("rope_scaling: expected an object or null, got {other}"),
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let factor = || -> Result<f64> {
        let f = obj
            .get("factor")
            .and_then(|f| f.as_f64())
            .with_context(|| format!("rope_scaling ({kind}): missing numeric `factor`"))?;
        if !(f.is_finite() && f >= 1.0) {
            bail!("rope_scaling ({kind}): factor must be >= 1, got {f}");
        }
        Ok(f)
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        // Dynamic NTK only rescales beyond max_position_embeddings; validate and ignore.
        "dynamic" => factor().map(|_| None),
        other => bail!(
            "rope_scaling: unsupported type `{other}` (ftrun supports none, linear and dynamic)"
        ),
    }
}

/// RoPE's base: top-level `rope_theta` (transformers < 5) or `rope_parameters.rope_theta`
/// (transformers 5); 10000 when neither is given; both given and different is an error.
fn rope_theta(raw: &RawConfig) -> Result<f64> {
    let nested = match &raw.rope_parameters {
        Some(serde_json::Value::Object(o)) => match o.get("rope_theta") {
            None => None,
            Some(v) => Some(v.as_f64().with_context(|| {
                format!("rope_parameters.rope_theta: expected a number, got {v}")
            })?),
        },
        None | Some(serde_json::Value::Null) => None,
        Some(other) => bail!("rope_parameters: expected an object or null, got {other}"),
    };
    match (raw.rope_theta, nested) {
        (Some(top), Some(inner)) if top != inner => bail!(
            "rope_theta {top} and rope_parameters.rope_theta {inner} disagree; keep one of them"
        ),
        (Some(theta), _) | (None, Some(theta)) => Ok(theta),
        (None, None) => Ok(default_theta()),
    }
}

/// A token id field that may be a number or a list (Llama 3 lists several EOS ids).
fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
        serde_json::Value::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        _ => None,
    }
}

impl ModelConfig {
    /// Read `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read the model's config.json", path.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_str(text).context("invalid config.json")?;
        let hf_architecture = raw.architectures.first().cloned().unwrap_or_default();
        let arch = match (hf_architecture.as_str(), raw.model_type.as_str()) {
            ("LlamaForCausalLM", _) | (_, "llama") => Arch::Llama,
            ("Qwen2ForCausalLM", _) | (_, "qwen2") => Arch::Qwen2,
            ("InternLM2ForCausalLM", _) | (_, "internlm2") => Arch::InternLM2,
            (a, m) => bail!(
                "unsupported architecture `{a}` (model_type `{m}`): ftrun trains LlamaForCausalLM, \
                 Qwen2ForCausalLM and InternLM2ForCausalLM"
            ),
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                bail!("unsupported hidden_act `{act}`: only silu (SwiGLU) decoders are supported");
            }
        }
        let rope_theta = rope_theta(&raw)?;
        let rope_scaling = match &raw.rope_scaling {
            None | Some(serde_json::Value::Null) => {
                parse_rope_scaling(&raw.rope_parameters).context("rope_parameters")?
            }
            given => parse_rope_scaling(given)?,
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads % num_kv_heads != 0 {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                raw.num_attention_heads
            );
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        let (qkv_bias, out_bias) = match arch {
            Arch::Llama => (raw.attention_bias.unwrap_or(false), false),
            Arch::Qwen2 => (true, false),
            Arch::InternLM2 => (raw.bias.unwrap_or(false), raw.bias.unwrap_or(false)),
        };
        Ok(ModelConfig {
            arch,
            hf_architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            out_bias,
            bos_token_id: first_id(&raw.bos_token_id),
            eos_token_id: first_id(&raw.eos_token_id),
            torch_dtype: raw
                .torch_dtype
                .or(raw.dtype)
                .unwrap_or_else(|| "float32".into()),
            rope_scaling,
        })
    }

    /// Parameters of the whole model (embedding, blocks, norm, head).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * self.intermediate_size;
        let block = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * block + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_rope(rope: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "rope_scaling": {rope}}}"#
        ))
    }

    fn llama(extra: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2{extra}}}"#
        ))
    }

    #[test]
    fn rope_theta_top_level_or_in_transformers5_rope_parameters() {
        assert_eq!(llama("").unwrap().rope_theta, 10000.0);
        assert_eq!(
            llama(r#", "rope_theta": 500000.0"#).unwrap().rope_theta,
            500000.0
        );
        let v5 = llama(r#", "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}"#)
            .unwrap();
        assert_eq!(v5.rope_theta, 1000000.0);
        assert_eq!(v5.rope_scaling, None);
        let linear = llama(
            r#", "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 2.0}"#,
        )
        .unwrap();
        assert_eq!(
            linear.rope_scaling,
            Some(RopeScaling::Linear { factor: 2.0 })
        );
        let both =
            llama(r#", "rope_theta": 10000.0, "rope_parameters": {"rope_theta": 1000000.0}"#)
                .unwrap_err();
        assert!(format!("{both:#}").contains("disagree"), "{both:#}");
        let bad = llama(r#", "rope_parameters": {"rope_theta": "big"}"#).unwrap_err();
        assert!(
            format!("{bad:#}").contains("rope_parameters.rope_theta"),
            "{bad:#}"
        );
    }

    #[test]
    fn rope_scaling_none_linear_dynamic() {
        assert_eq!(with_rope("null").unwrap().rope_scaling, None);
        assert_eq!(
            with_rope(r#"{"type": "linear", "factor": 4.0}"#)
                .unwrap()
                .rope_scaling,
            Some(RopeScaling::Linear { factor: 4.0 })
        );
        assert_eq!(
            with_rope(r#"{"rope_type": "dynamic", "factor": 2.0}"#)
                .unwrap()
                .rope_scaling,
            None
        );
        assert_eq!(
            with_rope(r#"{"rope_type": "default"}"#)
                .unwrap()
                .rope_scaling,
            None
        );
    }

    #[test]
    fn rope_scaling_unsupported_or_malformed_is_named() {
        let msg = format!(
            "{:#}",
            with_rope(r#"{"rope_type": "llama3", "factor": 8.0}"#).unwrap_err()
        );
        assert!(msg.contains("`llama3`"), "{msg}");
        let msg = format!("{:#}", with_rope(r#"{"type": "linear"}"#).unwrap_err());
        assert!(msg.contains("factor"), "{msg}");
        let msg = format!(
            "{:#}",
            with_rope(r#"{"type": "linear", "factor": 0.5}"#).unwrap_err()
        );
        assert!(msg.contains("0.5"), "{msg}");
    }
}
