#!/usr/bin/env python3
"""Check an `ftrun export --hf-llava` directory against ftrun itself with transformers.

Trains nothing. Given the exported Hugging Face directory (LlavaForConditionalGeneration
layout), the XTuner-layout export ftrun chats with (`--llava`, `--llm`, `--visual-encoder`),
an image and a question, it:

1. loads the directory with `LlavaForConditionalGeneration.from_pretrained` (no missing or
   unexpected keys allowed) and `AutoProcessor.from_pretrained`;
2. renders the question with the exported chat template and the processor, and checks the
   token ids equal ftrun's (`ftrun logits --llava`, the chat path) with the image placeholder
   expanded to `image_seq_length` image tokens;
3. runs transformers on ftrun's preprocessed pixels and compares the logits at every text
   position and the image's last row with ftrun's (max abs error, PASS under --tol);
4. reports how far the exported image processor's pixels are from ftrun's preprocessing
   (different bicubic implementations; PASS under --pixel-tol) and the logits error with them.

Prints one line per check and PASS or FAIL; exits 1 on FAIL.

Example (after the tiny LLaVA runs, see the report / README):
  python3 scripts/check_llava_hf.py --ftrun target/release/ftrun --hf $D/hf \
      --llava $D/export --llm $D/tiny-llama --visual-encoder $D/tiny-clip \
      --image $D/images/red_square.png --prompt "What colour is the shape?"
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ftrun", required=True, help="the ftrun binary")
    ap.add_argument("--hf", required=True, help="the LlavaForConditionalGeneration directory")
    ap.add_argument("--llava", required=True, help="ftrun's LLaVA export (projector/, adapters)")
    ap.add_argument("--llm", required=True, help="the base LLM directory")
    ap.add_argument("--visual-encoder", required=True, help="the CLIP tower directory")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True, help="the user's question")
    ap.add_argument("--device", default="cpu", help="ftrun's --device")
    ap.add_argument("--tol", type=float, default=1e-3, help="max abs logits error (same pixels)")
    ap.add_argument("--pixel-tol", type=float, default=0.05,
                    help="max abs difference of normalized pixels, processor vs ftrun")
    a = ap.parse_args()
    torch.manual_seed(0)
    ok = True

    def check(name, passed, detail):
        nonlocal ok
        ok &= bool(passed)
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")

    model, info = LlavaForConditionalGeneration.from_pretrained(
        a.hf, dtype=torch.float32, output_loading_info=True)
    model.eval()
    bad_keys = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    check("load LlavaForConditionalGeneration", not bad_keys, bad_keys or "every key in place")
    processor = AutoProcessor.from_pretrained(a.hf)
    cfg = model.config

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": a.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = processor.tokenizer.bos_token or ""
    ftrun_text = text[len(bos):] if bos and text.startswith(bos) else text
    print(f"     prompt: {text!r}")

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.json")
        cmd = [a.ftrun, "logits", a.llm, "--llava", a.llava, "--visual-encoder", a.visual_encoder,
               "--image", a.image, "--text", ftrun_text, "--device", a.device, "--out", out]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            ft = json.load(f)

    n_img = ft["image_tokens"]
    check("image_seq_length", cfg.image_seq_length == n_img, f"config {cfg.image_seq_length}, ftrun {n_img}")
    want_ids = []
    for t in ft["input_ids"]:
        want_ids.extend([cfg.image_token_index] * n_img if t == -1 else [t])
    image = Image.open(a.image)
    inputs = processor(images=image, text=text, return_tensors="pt")
    hf_ids = inputs["input_ids"][0].tolist()
    check("token ids (chat template + processor vs ftrun chat path)", hf_ids == want_ids,
          f"{len(hf_ids)} ids" if hf_ids == want_ids else f"transformers {hf_ids} vs ftrun {want_ids}")
    ids = torch.tensor([want_ids])

    ft_pixels = torch.tensor(ft["pixel_values"], dtype=torch.float32).unsqueeze(0)  # [1, 3, S, S]
    ft_logits = np.asarray(ft["logits"], dtype=np.float64)  # [rows, vocab]
    positions = ft["positions"]
    vocab = ft_logits.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=ft_pixels).logits[0].double().numpy()
    err = np.abs(logits[positions, :vocab] - ft_logits).max()
    scale = np.abs(ft_logits).max()
    check("logits, same pixels", err < a.tol,
          f"max abs error {err:.3e} over {len(positions)} positions x {vocab} (|logits| <= {scale:.2f}; tol {a.tol})")
    agree = (logits[positions, :vocab].argmax(-1) == ft_logits.argmax(-1)).mean()
    check("greedy next tokens agree", agree == 1.0, f"{agree * 100:.0f}% of positions")
    if logits.shape[1] > vocab:
        extra = logits.shape[1] - vocab
        suppressed = set(model.generation_config.suppress_tokens or [])
        check("added image-token column suppressed in generation",
              cfg.image_token_index in suppressed, f"{extra} extra column(s); suppress_tokens {sorted(suppressed)}")

    hf_pixels = inputs["pixel_values"].float()
    pix = (hf_pixels - ft_pixels).abs()
    check("image processor vs ftrun preprocessing", pix.max().item() < a.pixel_tol,
          f"max abs {pix.max().item():.4f}, mean {pix.mean().item():.5f} (normalized units; tol {a.pixel_tol})")
    with torch.no_grad():
        logits_p = model(**inputs).logits[0].double().numpy()
    err_p = np.abs(logits_p[positions, :vocab] - ft_logits).max()
    print(f"     logits with the processor's own pixels: max abs error {err_p:.3e} (informational)")

    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
