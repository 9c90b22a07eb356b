#!/usr/bin/env bash
# On the GPU machine: the trainer on CUDA, bf16 full fine-tuning of the tiny demo model (one-write
# bf16 gradients and the split fp32 master are on there), 8 steps with checkpoints at 4 and 8,
# against a second run resumed from the first one's step-4 checkpoint: both step-8 checkpoints
# must be identical.
# Usage: B=/tmp/b/ftrun bash scripts/gpu_resume.sh   (DEV=cpu: on the CPU, where the master is not split)
B=${B:-/tmp/b/ftrun}; D=${D:-/tmp/demo}; R=${R:-/tmp/res/resume}; DEV=${DEV:-cuda}
mkdir -p $R
[ -d $D/tiny-llama ] || $B demo --dir $D --steps 1 --prompt hi > $R/demo.log 2>&1
sed -e "s#work_dirs/demo#$D#g" -e 's/method = "lora"/method = "full"/' -e "s/device = \"cpu\"/device = \"$DEV\"/" \
    -e 's/max_steps = 60/max_steps = 8/' -e 's/save_steps = 30/save_steps = 4\nsave_final = true/' \
    -e 's/every_steps = 30/every_steps = 1000/' -e 's/lr = 3e-3/lr = 1e-3/' configs/tiny_demo_assistant.toml > $R/full.toml
grep -q '^dtype' $R/full.toml || sed -i 's#^path = "'$D'/tiny-llama"#&\ndtype = "bf16"#' $R/full.toml
rm -rf $R/wA $R/wC
$B train $R/full.toml --work-dir $R/wA > $R/trainA.log 2>&1; echo "A rc=$?"
$B train $R/full.toml --work-dir $R/wC --resume $R/wA/checkpoints/step-000004 > $R/trainC.log 2>&1; echo "C rc=$?"
grep -h "model:\|loss" $R/trainA.log | head -12
python3 - $R/wA/checkpoints/step-000008 $R/wC/checkpoints/step-000008 <<'PY'
import sys, glob, os
from safetensors.numpy import load_file
a, c = sys.argv[1], sys.argv[2]
fa = sorted(os.path.basename(f) for f in glob.glob(a + "/*.safetensors"))
same, n = True, 0
for f in fa:
    x, y = load_file(os.path.join(a, f)), load_file(os.path.join(c, f))
    for k in x:
        n += 1
        if x[k].tobytes() != y[k].tobytes():
            same = False; print("DIFF", f, k)
print("resume files", fa, "tensors", n, "bit-identical" if same and n else "NOT identical")
PY
for f in trainable optimizer; do
  cmp $R/wA/checkpoints/step-000008/$f.safetensors $R/wC/checkpoints/step-000008/$f.safetensors && echo "$f.safetensors byte-identical"
done
