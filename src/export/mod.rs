//! Getting a trained model out: a checkpoint becomes a PEFT adapter (LoRA) or a Hugging Face model
//! directory (full fine-tuning), and an adapter merges into its base model.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use crate::config::{Config, LoraConfig};
use crate::model::weights::{load_weights, save_sharded};
use crate::model::ModelConfig;
use crate::train::checkpoint;

pub mod llava_hf;

/// PEFT stores adapter keys under the wrapped model: `base_model.model.<HF module path>`.
const PEFT_PREFIX: &str = "base_model.model.";

/// Files copied next to exported/merged weights so the directory is a complete HF model.
const MODEL_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
];

/// The LoRA settings of an adapter directory (adapter_config.json).
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: usize,
    pub alpha: f64,
    pub base: String,
}

fn copy_side_files(from: &Path, to: &Path, skip_config: bool) -> Result<()> {
    for f in MODEL_SIDE_FILES {
        if skip_config && *f == "config.json" {
            continue;
        }
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// `ftrun export CKPT OUT`: LoRA -> PEFT adapter; full -> HF model directory.
pub fn export_checkpoint(ckpt_dir: &Path, out: &Path) -> Result<()> {
    export_checkpoint_with(ckpt_dir, out, None)
}

/// [`export_checkpoint`]; for a LLaVA run, `hf_llava` also gets the model in the Hugging Face
/// `LlavaForConditionalGeneration` layout ([`llava_hf::export_llava_hf`]).
pub fn export_checkpoint_with(ckpt_dir: &Path, out: &Path, hf_llava: Option<&Path>) -> Result<()> {
    let ck = checkpoint::load(ckpt_dir, &Device::Cpu)?;
    let cfg = Config::from_toml(&ck.config_toml)
        .with_context(|| format!("{}: config.toml cannot be read", ckpt_dir.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if let Some(llava) = &cfg.llava {
        export_llava(&cfg, &ck.trainable, out)?;
        if let Some(hf) = hf_llava {
            let paths = crate::infer::llava::LlavaPaths {
                llm: &cfg.model.path,
                visual_encoder: &llava.vision_tower,
                llava: out,
                adapter: None,
            };
            let template = crate::data::template::Template::by_name(&cfg.data.template)?;
            llava_hf::export_llava_hf(&paths, &(&template).into(), hf)?;
        }
        return Ok(());
    }
    if let Some(hf) = hf_llava {
        bail!(
            "--hf-llava {}: {} is not a LLaVA run (its config has no [llava])",
            hf.display(),
            ckpt_dir.display()
        );
    }
    match cfg.train.method.as_str() {
        "full" => export_full(&cfg, &ck.trainable, out),
        _ => write_peft_adapter(&cfg.lora, &cfg.model.path, &ck.trainable, out),
    }
}

/// A LLaVA checkpoint as XTuner's `pth_to_hf` lays it out: `projector/` (safetensors +
/// config.json), and what the stage trained of the LLM (`llm_adapter/`, a PEFT adapter, or
/// `llm/`, the full model) and of the tower (`visual_encoder_adapter/`, a PEFT adapter).
fn export_llava(cfg: &Config, trainable: &[(String, Tensor)], out: &Path) -> Result<()> {
    let llava = cfg.llava.as_ref().context("not a LLaVA config")?;
    let prefix = crate::model::llava::LlavaModel::PROJECTOR_PREFIX;
    let (mut projector, mut vision, mut llm) = (vec![], vec![], vec![]);
    for (name, t) in trainable {
        if let Some(rest) = name.strip_prefix(prefix) {
            projector.push((rest.to_string(), t.clone()));
        } else if name.starts_with("vision_model.") {
            vision.push((name.clone(), t.clone()));
        } else {
            llm.push((name.clone(), t.clone()));
        }
    }
    write_projector(&projector, &out.join("projector"))?;
    if !vision.is_empty() {
        let lora = llava
            .vision_lora
            .as_ref()
            .context("vision adapters in the checkpoint but no [llava.vision_lora]")?;
        write_peft_adapter_as(
            lora,
            &llava.vision_tower,
            &vision,
            &out.join("visual_encoder_adapter"),
            None,
        )?;
    }
    if !llm.is_empty() {
        match cfg.train.method.as_str() {
            "full" => {
                let dir = out.join("llm");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                export_full(cfg, &llm, &dir)?
            }
            _ => write_peft_adapter(&cfg.lora, &cfg.model.path, &llm, &out.join("llm_adapter"))?,
        }
    }
    Ok(())
}

/// The projector as XTuner's `ProjectorModel` saves it: `model.0.*`, `model.2.*` in
/// `model.safetensors` and its `config.json`.
fn write_projector(tensors: &[(String, Tensor)], dir: &Path) -> Result<()> {
    let get = |n: &str| -> Result<&Tensor> {
        tensors
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, t)| t)
            .with_context(|| format!("the checkpoint has no projector tensor `{n}`"))
    };
    let (llm_hidden, visual_hidden) = get("model.0.weight")?.dims2()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = json!({
        "architectures": ["ProjectorModel"],
        "model_type": "projector",
        "visual_hidden_size": visual_hidden,
        "llm_hidden_size": llm_hidden,
        "depth": 2,
        "hidden_act": "gelu",
        "bias": true,
        "torch_dtype": "float32",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let list = crate::model::llava::Projector::NAMES
        .iter()
        .map(|n| Ok((n.to_string(), get(n)?.clone())))
        .collect::<Result<Vec<_>>>()?;
    save_sharded(dir, &list, usize::MAX, DType::F32)?;
    println!("projector written to {}", dir.display());
    Ok(())
}

/// Write `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names.
pub fn write_peft_adapter(
    lora: &LoraConfig,
    base: &Path,
    trainable: &[(String, Tensor)],
    out: &Path,
) -> Result<()> {
    write_peft_adapter_as(lora, base, trainable, out, Some("CAUSAL_LM"))
}

/// [`write_peft_adapter`] with PEFT's `task_type` (None for a vision tower, as XTuner's
/// visual encoder LoRA).
pub fn write_peft_adapter_as(
    lora: &LoraConfig,
    base: &Path,
    trainable: &[(String, Tensor)],
    out: &Path,
    task_type: Option<&str>,
) -> Result<()> {
    let mut targets = BTreeSet::new();
    let mut tensors = HashMap::new();
    for (name, t) in trainable {
        // model.layers.0.self_attn.q_proj.lora_A.weight -> target `q_proj`
        let module = name
            .split(".lora_")
            .next()
            .filter(|_| name.contains(".lora_"))
            .with_context(|| format!("`{name}` is not a LoRA tensor"))?;
        targets.insert(module.rsplit('.').next().unwrap_or(module).to_string());
        tensors.insert(format!("{PEFT_PREFIX}{name}"), t.to_dtype(DType::F32)?);
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "bias": "none",
        "target_modules": targets,
        "base_model_name_or_path": base.display().to_string(),
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": false,
        "use_dora": false,
        "revision": null,
    });
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    candle_core::safetensors::save(&tensors, out.join("adapter_model.safetensors"))?;
    println!(
        "PEFT adapter written to {} ({} tensors, targets {:?})",
        out.display(),
        tensors.len(),
        targets
    );
    Ok(())
}

/// The full model: base weights with every trained tensor replaced, in the base's dtype.
fn export_full(cfg: &Config, trainable: &[(String, Tensor)], out: &Path) -> Result<()> {
    let mcfg = ModelConfig::from_dir(&cfg.model.path)?;
    let dtype = storage_dtype(&mcfg.torch_dtype);
    let mut weights = load_weights(&cfg.model.path, dtype, &Device::Cpu, |_| true)?;
    for (name, t) in trainable {
        if !weights.contains_key(name) {
            bail!(
                "checkpoint tensor `{name}` is not in the base model {}",
                cfg.model.path.display()
            );
        }
        weights.insert(name.clone(), t.to_dtype(dtype)?);
    }
    let mut list: Vec<(String, Tensor)> = weights.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    save_sharded(out, &list, 2 << 30, dtype)?;
    copy_side_files(&cfg.model.path, out, false)?;
    println!("Hugging Face model written to {}", out.display());
    Ok(())
}

/// candle dtype of a config.json `torch_dtype`.
pub fn storage_dtype(torch_dtype: &str) -> DType {
    match torch_dtype {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        _ => DType::F32,
    }
}

/// Read a PEFT adapter directory: its config and tensors keyed by HF module path (prefix removed).
pub fn read_adapter(dir: &Path) -> Result<(AdapterConfig, HashMap<String, Tensor>)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{}: not a PEFT adapter", cfg_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    if v["peft_type"] != "LORA" {
        bail!(
            "{}: peft_type {} is not LORA",
            cfg_path.display(),
            v["peft_type"]
        );
    }
    let r = v["r"].as_u64().context("adapter_config.json has no `r`")? as usize;
    let alpha = v["lora_alpha"]
        .as_f64()
        .context("adapter_config.json has no `lora_alpha`")?;
    let base = v["base_model_name_or_path"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let wpath = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&wpath, &Device::Cpu)
        .with_context(|| format!("reading {}", wpath.display()))?;
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| (k.strip_prefix(PEFT_PREFIX).unwrap_or(&k).to_string(), t))
        .collect();
    Ok((AdapterConfig { r, alpha, base }, tensors))
}

/// W += (alpha / r) * B @ A for every LoRA pair, in f32, written back in W's dtype.
pub fn merge_into(
    weights: &mut HashMap<String, Tensor>,
    adapter: &AdapterConfig,
    lora: &HashMap<String, Tensor>,
) -> Result<usize> {
    let scale = adapter.alpha / adapter.r as f64;
    let mut merged = 0;
    for (name, a) in lora {
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = lora
            .get(&format!("{module}.lora_B.weight"))
            .with_context(|| format!("adapter has {name} but no {module}.lora_B.weight"))?;
        let wname = format!("{module}.weight");
        let w = weights.get(&wname).with_context(|| {
            format!("adapter targets `{wname}`, which the base model does not have")
        })?;
        // [out, r] @ [r, in] -> [out, in]
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        let new = (w.to_dtype(DType::F32)? + delta.to_device(w.device())?)?.to_dtype(w.dtype())?;
        weights.insert(wname, new);
        merged += 1;
    }
    if merged == 0 {
        bail!("the adapter holds no lora_A/lora_B pairs");
    }
    Ok(merged)
}

/// The model in `base` in its storage dtype on the CPU, with the PEFT adapter in
/// `adapter` merged when given.
pub fn load_merged(
    base: &Path,
    adapter: Option<&Path>,
) -> Result<(ModelConfig, HashMap<String, Tensor>)> {
    let mcfg = ModelConfig::from_dir(base)?;
    let dtype = storage_dtype(&mcfg.torch_dtype);
    let mut weights = load_weights(base, dtype, &Device::Cpu, |_| true)?;
    if let Some(dir) = adapter {
        let (acfg, lora) = read_adapter(dir)?;
        let n = merge_into(&mut weights, &acfg, &lora)?;
        println!(
            "merged {n} LoRA modules of {} into {}",
            dir.display(),
            base.display()
        );
    }
    Ok((mcfg, weights))
}

/// `ftrun merge BASE ADAPTER OUT`: base + adapter -> full model in shards + config + tokenizer.
pub fn merge(base: &Path, adapter_dir: &Path, out: &Path, max_shard_bytes: usize) -> Result<()> {
    let (mcfg, weights) = load_merged(base, Some(adapter_dir))?;
    let dtype = storage_dtype(&mcfg.torch_dtype);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut list: Vec<(String, Tensor)> = weights.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    save_sharded(out, &list, max_shard_bytes, dtype)?;
    copy_side_files(base, out, false)?;
    println!("merged model written to {}", out.display());
    Ok(())
}
