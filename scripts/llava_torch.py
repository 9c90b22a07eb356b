#!/usr/bin/env python3
"""PyTorch peer of `ftrun bench --llava` (the LLaVA finetune stage), and the CLIP towers it uses.

  make-clip SHAPE OUT [--dtype D] [--noise S]
        random-init transformers CLIPVisionModel of a real shape (HF safetensors, config.json,
        preprocessor_config.json); --noise adds N(0, S) to every LayerNorm and bias (the init
        leaves them at 1 / 0), so a parity check exercises them
  train DIR --method M [--steps N --warmup W --device cuda|cpu]
        replays DIR's `ftrun bench --llava` run (same LLM and CLIP weights, same initial adapter
        and projector, same token rows and pixel values, same optimizer) with transformers'
        LlavaForConditionalGeneration + peft and writes DIR/torch_llava_M.json

The Llava model is assembled next to the LLM (DIR/model's target + `_llava_...`) from the LLM (a Llama-architecture directory),
the CLIP tower and ftrun's initial projector: vision_feature_layer -2, CLS dropped, projector
Linear-GELU-Linear with biases, image_token_id 0 (the id of the image rows in batches.json).
Trained: LoRA on every linear of the LLM (QLoRA: the LLM's linears as bitsandbytes NF4 with double
quantization, bf16 compute; tower, projector and head unquantized) or the whole LLM (full), and
the projector; the tower is frozen. SDPA attention, gradient checkpointing, bf16 autocast and
fused AdamW on CUDA (f32, no autocast on CPU, for a smoke test against ftrun on CPU).
"""
import argparse
import hashlib
import json
import os
import sys
import time

CLIP_SHAPES = {
    # openai/clip-vit-large-patch14-336's vision tower.
    "clip_vit_large_p14_336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=336, patch_size=14,
                                   projection_dim=768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 image_size=56, patch_size=14, projection_dim=32),
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Modules of LlavaForConditionalGeneration that stay unquantized under QLoRA (as XTuner loads
# only the LLM in 4 bits; the head stays bf16 as transformers' default keeps it).
UNQUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def make_clip(shape, out, seed=0, dtype="float32", noise=0.0, device=None):
    """A random-init CLIPVisionModel of `shape` saved to `out`; returns the model (eval, f32)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(**CLIP_SHAPES[shape], hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           attention_dropout=0.0)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):
        model = CLIPVisionModel(cfg).eval()
    if noise:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(noise * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    s = cfg.image_size
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                       do_center_crop=True, resample=3, image_mean=CLIP_MEAN,
                       image_std=CLIP_STD).save_pretrained(out)
    print(f"made CLIP {shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) in {out}")
    return model.float()


def load_dir(d):
    """Every tensor of a safetensors directory (sharded or not)."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def assemble_llava(llm_dir, clip_dir, projector_dir, out):
    """A LlavaForConditionalGeneration directory from the LLM, the tower and the projector."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlavaConfig
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return
    os.makedirs(out, exist_ok=True)
    state = {}
    for k, v in load_dir(llm_dir).items():
        # LlamaForCausalLM `model.*` -> `model.language_model.*`; `lm_head.*` stays.
        state["model.language_model." + k[len("model."):] if k.startswith("model.") else k] = v
    for k, v in load_dir(clip_dir).items():
        if k.startswith("vision_model.post_layernorm"):
            continue  # not on the path to hidden_states[-2]
        state["model.vision_tower." + k] = v
    names = {"model.0": "linear_1", "model.2": "linear_2"}
    for k, v in load_dir(projector_dir).items():
        head, leaf = k.rsplit(".", 1)
        state[f"model.multi_modal_projector.{names[head]}.{leaf}"] = v
    dtype = state["model.language_model.embed_tokens.weight"].dtype
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    vision = AutoConfig.from_pretrained(clip_dir)
    cfg = LlavaConfig(vision_config=vision.to_dict(),
                      text_config=AutoConfig.from_pretrained(llm_dir).to_dict(),
                      image_token_id=0, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    cfg.save_pretrained(out)
    # Written last, under a temporary name: its presence marks a complete directory.
    save_file(state, os.path.join(out, "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(out, "model.safetensors.tmp"), os.path.join(out, "model.safetensors"))


def train(d, method, steps, lr, warmup, checkpointing, device):
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    meta = json.load(open(os.path.join(d, f"ftrun_llava_{method}.json")))
    batches = json.load(open(os.path.join(d, "batches.json")))
    pixels_all = load_file(os.path.join(d, "pixels.safetensors"))["pixel_values"]  # [steps, B, 3, S, S]
    cuda = device == "cuda"
    # Assembled once per (LLM, tower, initial projector), next to the LLM: runs of other
    # methods with the same seed share it.
    llm = os.path.realpath(os.path.join(d, "model"))
    proj = os.path.join(d, "init_projector")
    with open(os.path.join(proj, "model.safetensors"), "rb") as f:
        proj_hash = hashlib.sha256(f.read()).hexdigest()[:12]
    llava_dir = f"{llm}_llava_{os.path.basename(os.path.realpath(meta['visual_encoder']))}_{proj_hash}"
    assemble_llava(llm, meta["visual_encoder"], proj, llava_dir)
    torch.manual_seed(0)
    # bf16 weights, bf16 autocast on CUDA (full: f32 master weights); f32 on CPU.
    dtype = torch.bfloat16 if cuda and method != "full" else torch.float32
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if method == "qlora":
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
            llm_int8_skip_modules=UNQUANTIZED)
        kw["device_map"] = {"": 0 if cuda else "cpu"}
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, **kw)
    if method != "qlora":
        model = model.to(device)
    if method == "full":
        for n, p in model.named_parameters():
            p.requires_grad = not n.startswith("model.vision_tower")
    else:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        acfg = json.load(open(os.path.join(d, "init_adapter", "adapter_config.json")))
        lcfg = LoraConfig(r=acfg["r"], lora_alpha=acfg["lora_alpha"], lora_dropout=0.0,
                          target_modules=rf".*language_model\.layers\.\d+\..*\.({'|'.join(LLM_LINEARS)})")
        model = get_peft_model(model, lcfg)
        # ftrun's adapter names the LlamaForCausalLM path; here the LLM sits under language_model.
        init = load_file(os.path.join(d, "init_adapter", "adapter_model.safetensors"))
        init = {k.replace("base_model.model.model.", "base_model.model.model.language_model."): v
                for k, v in init.items()}
        res = set_peft_model_state_dict(model, init)
        unexpected = getattr(res, "unexpected_keys", [])
        assert not unexpected, f"adapter tensors that match no module: {unexpected[:4]}"
        n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
        assert n_lora == len(init), f"{n_lora} LoRA tensors in the model, {len(init)} in the adapter"
        for n, p in model.named_parameters():
            if "multi_modal_projector" in n:
                p.requires_grad = True
            if p.requires_grad:
                p.data = p.data.float()
    if checkpointing:
        # The trainable projector feeds the LLM's inputs, so checkpointed layers get gradients
        # without enable_input_require_grads (which would make the frozen tower backward too).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if n_trainable != meta["trainable_params"]:
        print(f"WARNING: {n_trainable} trainable parameters here, ftrun trains {meta['trainable_params']}")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    load_mem = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows, times = [], []
    for step in range(steps):
        b = batches[step % len(batches)]
        ids = torch.tensor(b["input_ids"], device=device)
        labels = torch.tensor(b["labels"], device=device)
        pixels = pixels_all[step % len(batches)].to(device)  # [B, 3, S, S]
        sync()
        t0 = time.time()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            out = model(input_ids=ids, pixel_values=pixels.to(torch.bfloat16 if cuda else torch.float32),
                        labels=labels)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.time() - t0
        if step >= warmup:
            times.append(dt)
        rows.append({"step": step + 1, "loss": out.loss.item(), "grad_norm": gn.item(), "time": dt})
        print(json.dumps(rows[-1]), flush=True)
    tokens = sum(len(r) for r in batches[0]["input_ids"])
    mib = 2 ** 20
    res = {
        "method": method, "rows": rows, "trainable_params": n_trainable,
        "tokens_per_sec": tokens * len(times) / max(sum(times), 1e-9),
        "peak_mib_after_load": torch.cuda.max_memory_allocated() / mib if cuda else 0,
        "peak_mib_total": (torch.cuda.max_memory_allocated() + load_mem) / mib if cuda else 0,
        "load_mib": load_mem / mib,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / mib if cuda else 0,
        # Everything on the device as the driver sees it (CUDA context and caches included).
        "used_end_mib": (lambda f, t: (t - f) / mib)(*torch.cuda.mem_get_info()) if cuda else 0,
    }
    json.dump(res, open(os.path.join(d, f"torch_llava_{method}.json"), "w"), indent=1)
    print(f"torch llava_{method}: {res['tokens_per_sec']:.0f} tokens/s, "
          f"peak {res['peak_mib_after_load']:.0f} MiB after load")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-clip")
    m.add_argument("shape", choices=CLIP_SHAPES)
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    m.add_argument("--noise", type=float, default=0.0)
    t = sub.add_parser("train")
    t.add_argument("dir")
    t.add_argument("--method", choices=["lora", "qlora", "full"], required=True)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--no-checkpointing", action="store_true")
    t.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    if a.cmd == "make-clip":
        make_clip(a.shape, a.out, a.seed, a.dtype, a.noise)
    else:
        train(a.dir, a.method, a.steps, a.lr, a.warmup, not a.no_checkpointing, a.device)


if __name__ == "__main__":
    sys.exit(main())
