#!/usr/bin/env python3
"""Interop check (GPU machine or any machine with torch, transformers, peft): ftrun's exported
PEFT adapter, merged model and full-fine-tune export load in transformers / peft and give the same
logits as ftrun.

  python3 scripts/check_export_torch.py BIN WORKDIR
WORKDIR is made here: the tiny demo (LoRA) is trained with BIN, exported, merged; a full
fine-tune of the same tiny model for a few steps is exported too.
"""
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

TEXT = "<|im_start|>user\n请介绍一下你自己<|im_end|>\n<|im_start|>assistant\n"


def run(*args):
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def ftrun_logits(bin_, model, adapter, out):
    cmd = [bin_, "logits", model, "--text", TEXT, "--out", out, "--device", "cpu"]
    if adapter:
        cmd += ["--adapter", adapter]
    run(*cmd)
    d = json.load(open(out))
    return d["input_ids"], torch.tensor(d["logits"], dtype=torch.float64)


def torch_logits(model_dir, adapter, ids):
    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter:
        from peft import PeftModel
        m = PeftModel.from_pretrained(m, adapter)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].double()


def main():
    bin_, wd = sys.argv[1], sys.argv[2]
    os.makedirs(wd, exist_ok=True)
    demo = os.path.join(wd, "demo")
    run(bin_, "demo", "--dir", demo, "--prompt", "请介绍一下你自己")
    base, adapter = os.path.join(demo, "tiny-llama"), os.path.join(demo, "adapter")
    merged = os.path.join(wd, "merged")
    run(bin_, "merge", base, adapter, merged, "--max-shard-size", "1MB")
    full_wd = os.path.join(wd, "full")
    cfg = ["--set", f'model.path="{base}"', "--set",
           f'data.files=[{{path="{os.path.join(demo, "assistant.jsonl")}", format="conversation"}}]',
           "--set", "train.method=full", "--set", "train.max_steps=4", "--set", "optim.lr=1e-3",
           "--set", "checkpoint.save_steps=4", "--set", "eval.inputs=[]"]
    run(bin_, "train", "tiny_demo_assistant", "--work-dir", full_wd, *cfg)
    full = os.path.join(wd, "full_hf")
    run(bin_, "export", os.path.join(full_wd, "checkpoints", "step-000004"), full)
    ok = True
    for name, model, adap in [("adapter (peft)", base, adapter), ("merged", merged, None), ("full export", full, None)]:
        ids, a = ftrun_logits(bin_, model, adap, os.path.join(wd, f"logits_{name.split()[0]}.json"))
        b = torch_logits(model, adap, ids)
        rel = ((a - b).norm() / b.norm()).item()
        mx = (a - b).abs().max().item()
        good = rel < 1e-5
        ok &= good
        print(f"{name:16s} tokens {len(ids):3d}  max|diff| {mx:.3e}  rel {rel:.3e}  {'PASS' if good else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
