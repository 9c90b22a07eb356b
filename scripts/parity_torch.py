#!/usr/bin/env python3
"""PyTorch reference for ftrun's GPU parity and benchmark runs (runs on the GPU machine).

  make-model SHAPE OUT        random-init LlamaForCausalLM of a real shape, saved as HF safetensors
  train DIR --method M ...    replays ftrun's `bench` run (same weights, same initial adapter,
                              same batches, same optimizer) in transformers + peft and writes
                              DIR/torch_METHOD.json with per-step loss / grad_norm, tokens/s, memory
  compare DIR --method M      prints ftrun's and PyTorch's per-step numbers side by side

Shapes: internlm2_1_8b (hidden 2048, 24 layers, 16 heads, 8 kv heads, inter 8192, vocab 92544, as a
Llama-architecture model), llama2_7b, tiny (for a smoke test).
"""
import argparse
import json
import math
import os
import sys
import time

SHAPES = {
    "internlm2_1_8b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=8, intermediate_size=8192, vocab_size=92544),
    "llama2_7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=688, vocab_size=1000),
}


def make_model(shape, out, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=32768, rms_norm_eps=1e-6,
                      rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    print(f"made {shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) in {out}")


def load_batches(d):
    with open(os.path.join(d, "batches.json")) as f:
        return json.load(f)


def train(d, method, steps, lr, warmup, checkpointing):
    import torch
    from transformers import LlamaForCausalLM
    meta = json.load(open(os.path.join(d, f"ftrun_{method}.json")))
    batches = load_batches(d)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    if method == "full":
        # fp32 master weights, bf16 autocast: what ftrun does (fp32 master + AdamW, bf16 compute).
        model = LlamaForCausalLM.from_pretrained(os.path.join(d, "model"), torch_dtype=torch.float32,
                                                 attn_implementation="sdpa").cuda()
    else:
        from peft import PeftModel
        if method == "qlora":
            # bitsandbytes NF4 + double quant, bf16 compute; embeddings, norms and head stay bf16
            # (no prepare_model_for_kbit_training fp32 upcast: ftrun keeps them bf16 too).
            from transformers import BitsAndBytesConfig
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
            base = LlamaForCausalLM.from_pretrained(os.path.join(d, "model"), dtype=dtype,
                                                    quantization_config=q, device_map={"": 0},
                                                    attn_implementation="sdpa")
        else:
            base = LlamaForCausalLM.from_pretrained(os.path.join(d, "model"), dtype=dtype,
                                                    attn_implementation="sdpa").cuda()
        model = PeftModel.from_pretrained(base, os.path.join(d, "init_adapter"), is_trainable=True)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    torch.cuda.synchronize()
    load_mem = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rows, times = [], []
    for step in range(steps):
        b = batches[step % len(batches)]
        ids = torch.tensor(b["input_ids"], device="cuda")
        labels = torch.tensor(b["labels"], device="cuda")
        torch.cuda.synchronize()
        t0 = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.time() - t0
        if step >= warmup:
            times.append(dt)
        rows.append({"step": step + 1, "loss": out.loss.item(), "grad_norm": gn.item(), "time": dt})
        print(json.dumps(rows[-1]), flush=True)
    tokens = sum(len(r) for r in batches[0]["input_ids"])
    res = {
        "method": method, "rows": rows,
        "tokens_per_sec": tokens * len(times) / max(sum(times), 1e-9),
        "peak_mib_after_load": torch.cuda.max_memory_allocated() / 2**20,
        "peak_mib_total": (torch.cuda.max_memory_allocated() + load_mem) / 2**20,
        "load_mib": load_mem / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        # Everything on the device as the driver sees it (CUDA context and caches included).
        "used_end_mib": (lambda f, t: (t - f) / 2**20)(*torch.cuda.mem_get_info()),
    }
    json.dump(res, open(os.path.join(d, f"torch_{method}.json"), "w"), indent=1)
    print(f"torch {method}: {res['tokens_per_sec']:.0f} tokens/s, peak {res['peak_mib_after_load']:.0f} MiB after load")


def compare(d, method, tol):
    f = json.load(open(os.path.join(d, f"ftrun_{method}.json")))
    t = json.load(open(os.path.join(d, f"torch_{method}.json")))
    worst = 0.0
    print(f"{'step':>4} {'ftrun loss':>11} {'torch loss':>11} {'rel':>8} {'ftrun gnorm':>12} {'torch gnorm':>12} {'rel':>8}")
    for a, b in zip(f["rows"], t["rows"]):
        rl = abs(a["loss"] - b["loss"]) / abs(b["loss"])
        rg = abs(a["grad_norm"] - b["grad_norm"]) / max(abs(b["grad_norm"]), 1e-12)
        worst = max(worst, rl)
        print(f"{a['step']:>4} {a['loss']:>11.5f} {b['loss']:>11.5f} {rl:>8.2e} {a['grad_norm']:>12.5f} {b['grad_norm']:>12.5f} {rg:>8.2e}")
    ok = worst <= tol
    print(f"{method}: worst loss rel diff {worst:.2e} (tolerance {tol:.0e}) -> {'PASS' if ok else 'FAIL'}")
    print(f"{method}: ftrun {f.get('tokens_per_sec', 0):.0f} tok/s, peak {f.get('peak_mib', 0):.0f} MiB | "
          f"torch {t['tokens_per_sec']:.0f} tok/s, peak {t['peak_mib_after_load']:.0f} MiB after load")
    return ok


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("shape", choices=SHAPES)
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train")
    t.add_argument("dir")
    t.add_argument("--method", choices=["lora", "qlora", "full"], required=True)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--no-checkpointing", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("dir")
    c.add_argument("--method", choices=["lora", "qlora", "full"], required=True)
    c.add_argument("--tol", type=float, default=2e-2)
    a = ap.parse_args()
    if a.cmd == "make-model":
        make_model(a.shape, a.out, a.seed)
    elif a.cmd == "train":
        train(a.dir, a.method, a.steps, a.lr, a.warmup, not a.no_checkpointing)
    else:
        sys.exit(0 if compare(a.dir, a.method, a.tol) else 1)


if __name__ == "__main__":
    main()
