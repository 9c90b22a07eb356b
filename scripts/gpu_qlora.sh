#!/usr/bin/env bash
# On the GPU machine: the QLoRA checks of the QLoRA issue in one go.
#  1. tests/fixtures/nf4 recomputed with bitsandbytes' CUDA kernels (bit-for-bit check);
#  2. QLoRA parity, speed and memory vs transformers + peft + bitsandbytes on the
#     InternLM2-1.8B shape (20 steps) and on the Llama-2-7B shape (memory target, fewer steps).
# Carries: .dev/bin/ftrun.xz (stripped CUDA binary, xz), .dev/bnb (bitsandbytes, CUDA 13.0 only).
# Usage: OUT=/some/dir bash scripts/gpu_qlora.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .bin
export PYTHONPATH=$PWD/.dev/bnb:${PYTHONPATH:-}
[ -x .bin/ftrun ] || { xz -dc .dev/bin/ftrun.xz > .bin/ftrun && chmod +x .bin/ftrun; }
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee "$OUT/versions.txt"
python3 scripts/fixtures/check_nf4_gpu.py > "$OUT/check_nf4_gpu.txt" 2>&1
echo "check_nf4_gpu.py exit $?" | tee -a "$OUT/check_nf4_gpu.txt"
tail -n 5 "$OUT/check_nf4_gpu.txt"
SHAPE=internlm2_1_8b STEPS=${STEPS_18:-20} METHODS=${METHODS_18:-qlora} D=/tmp/p18 OUT="$OUT" bash scripts/gpu_parity.sh
# Where a QLoRA step's time goes (synchronized per phase: slower than the run above).
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib FTRUN_PROFILE=1 .bin/ftrun bench \
  --model /tmp/p18/model --method qlora --steps 4 --warmup 1 --out /tmp/prof > "$OUT/profile_qlora_1_8b.txt" 2>&1
tail -n 25 "$OUT/profile_qlora_1_8b.txt"
SHAPE=llama2_7b STEPS=${STEPS_7:-8} METHODS=${METHODS_7:-qlora} D=/tmp/p7 OUT="$OUT" bash scripts/gpu_parity.sh
