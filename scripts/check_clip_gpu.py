#!/usr/bin/env python3
"""ftrun's CLIP vision tower and image preprocessing against transformers on the GPU machine.

Builds a random-init CLIPVisionModel of the CLIP ViT-L/14-336 shape with transformers (every
LayerNorm and bias perturbed, so they matter), saves it as HF safetensors (f32), draws a 500x375
image with PIL, and compares:

  pixels      `ftrun clip-features --image` (plain, and --pad-to-square as LLaVA finetuning)
              against CLIPImageProcessor (after LLaVA's expand2square for the padded one)
  f32         ftrun's features (hidden_states[-2], CLS dropped) of transformers' pixel values,
              f32 on CUDA, against CLIPVisionModel in f32 (TF32 off)
  bf16        the same in bf16, against the f32 reference, next to transformers' own bf16 error
  end-to-end  ftrun's features of its own pixels (f32) against transformers' of its own (info)

Tolerances (rel = max |a - b| / max |ref|, l2 = ||a - b|| / ||ref||):
  pixels: max abs <= 3 grey levels / std (0.0456) and mean abs <= 0.01 (bicubic rounding);
  f32: rel <= 1e-3 and l2 <= 1e-4;
  bf16: l2 <= 2 x transformers-bf16's l2 + 1e-3, and rel <= 2 x transformers-bf16's rel + 1e-3.

Run from the repository root (binary built with --features cuda):
    python3 scripts/check_clip_gpu.py --bin .bin/ftrun
Prints one line per check and PASS / FAIL; exits non-zero on FAIL. `--shape tiny --device cpu`
is a smoke test without a GPU.
"""
import argparse
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from llava_torch import CLIP_MEAN, make_clip  # noqa: E402

PIXEL_MAX_ABS = 3 / 255 / 0.26
PIXEL_MEAN_ABS = 0.01
F32_REL, F32_L2 = 1e-3, 1e-4


def errors(got, ref):
    d = (got.double() - ref.double())
    return {"max_abs": d.abs().max().item(), "rel": d.abs().max().item() / ref.abs().max().item(),
            "l2": (d.norm() / ref.double().norm()).item(), "mean_abs": d.abs().mean().item()}


def fmt(e):
    return f"max abs {e['max_abs']:.3e}, rel {e['rel']:.3e}, l2 {e['l2']:.3e}, mean abs {e['mean_abs']:.3e}"


def expand2square(img):
    """LLaVA's pad-to-square: the image centred on a square of the mean colour."""
    from PIL import Image
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=".bin/ftrun")
    ap.add_argument("--shape", default="clip_vit_large_p14_336")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--work", default="/tmp/clip-check")
    a = ap.parse_args()
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import CLIPImageProcessor
    # The reference in true f32: no TF32 in matmuls or the patch convolution.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if a.device == "cuda":
        import site
        sp = site.getsitepackages()[0]
        libs = [os.path.join(sp, "nvidia", "cu13", "lib"), os.path.join(sp, "nvidia", "nccl", "lib")]
        os.environ["LD_LIBRARY_PATH"] = ":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")])
    os.makedirs(a.work, exist_ok=True)
    clip = os.path.join(a.work, "clip")
    model = make_clip(a.shape, clip, seed=0, dtype="float32", noise=0.1, device=a.device).eval()

    # A 500x375 image: colour gradients with noise (reproducible).
    rng = np.random.default_rng(0)
    w, h = 500, 375
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1) + rng.integers(0, 40, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    image = os.path.join(a.work, "image.png")
    img.save(image)

    proc = CLIPImageProcessor.from_pretrained(clip)
    hf_px = proc(images=img, return_tensors="pt")["pixel_values"]  # [1, 3, S, S]
    hf_px_pad = proc(images=expand2square(img), return_tensors="pt")["pixel_values"]
    px_file = os.path.join(a.work, "hf_pixels.safetensors")
    save_file({"pixel_values": hf_px.contiguous()}, px_file)

    def hf_features(px, dtype):
        m = model.to(dtype)
        with torch.no_grad():
            hs = m(pixel_values=px.to(a.device, dtype), output_hidden_states=True).hidden_states
        return hs[-2][0, 1:].float().cpu()  # [N, D]

    ref = hf_features(hf_px, torch.float32)
    hf_bf16 = hf_features(hf_px, torch.bfloat16)

    def ftrun(name, *args):
        out = os.path.join(a.work, f"ftrun_{name}.safetensors")
        cmd = [a.bin, "clip-features", "--visual-encoder", clip, "--device", a.device, "-o", out, *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAILED: {' '.join(cmd)}\n{r.stderr}")
            sys.exit(2)
        return load_file(out)

    f32 = ftrun("f32", "--pixel-values", px_file, "--dtype", "f32")
    bf16 = ftrun("bf16", "--pixel-values", px_file, "--dtype", "bf16")
    own = ftrun("image", "--image", image, "--dtype", "f32")
    own_pad = ftrun("image_pad", "--image", image, "--pad-to-square", "--dtype", "f32")

    results = []

    def check(name, ok, detail):
        results.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name:<22} {detail}")

    for name, got, want in [("pixels", own["pixel_values"], hf_px[0]),
                            ("pixels (pad to square)", own_pad["pixel_values"], hf_px_pad[0])]:
        e = errors(got, want)
        check(name, e["max_abs"] <= PIXEL_MAX_ABS and e["mean_abs"] <= PIXEL_MEAN_ABS,
              f"{fmt(e)} (tol max abs {PIXEL_MAX_ABS:.3e}, mean abs {PIXEL_MEAN_ABS})")
    e = errors(f32["features"], ref)
    check(f"features f32 {a.device}", e["rel"] <= F32_REL and e["l2"] <= F32_L2,
          f"{fmt(e)} (tol rel {F32_REL}, l2 {F32_L2}); shape {tuple(f32['features'].shape)}")
    e_hf = errors(hf_bf16, ref)
    e = errors(bf16["features"], ref)
    tol_l2, tol_rel = 2 * e_hf["l2"] + 1e-3, 2 * e_hf["rel"] + 1e-3
    check(f"features bf16 {a.device}", e["l2"] <= tol_l2 and e["rel"] <= tol_rel,
          f"{fmt(e)} vs f32 ref; transformers bf16: {fmt(e_hf)} (tol l2 {tol_l2:.3e}, rel {tol_rel:.3e})")
    print(f"info  ftrun bf16 vs transformers bf16: {fmt(errors(bf16['features'], hf_bf16))}")
    print(f"info  end to end (each side's own pixels, f32): "
          f"{fmt(errors(own['features'], ref))}")
    ok = all(results) and len(results) == 4
    print(f"CLIP {a.shape} on {a.device}: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
