#!/usr/bin/env bash
# On the GPU machine: the same random-init model and batches in ftrun and in PyTorch
# (transformers LlamaForCausalLM + peft), 20 LoRA steps and 20 full steps, compared step by step.
# Usage: BIN=.bin/ftrun SHAPE=internlm2_1_8b STEPS=20 bash scripts/gpu_parity.sh
set -uo pipefail
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
BIN=${BIN:-.bin/ftrun}
SHAPE=${SHAPE:-internlm2_1_8b}
STEPS=${STEPS:-20}
SEQ=${SEQ:-2048}
METHODS=${METHODS:-lora full}
D=${D:-/tmp/parity}
OUT=${OUT:-/tmp/out}
mkdir -p "$D" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
[ -d "$D/model" ] || python3 scripts/parity_torch.py make-model "$SHAPE" "$D/model"
for M in $METHODS; do
  # Peak device memory of each process as the driver sees it (everything it allocated).
  "$BIN" bench --model "$D/model" --method "$M" --out "$D" --steps "$STEPS" --seq-len "$SEQ" \
    > "$OUT/ftrun_${SHAPE}_$M.log" 2>&1 || { echo "ftrun bench $M failed:"; tail -n 30 "$OUT/ftrun_${SHAPE}_$M.log"; continue; }
  tail -n 2 "$OUT/ftrun_${SHAPE}_$M.log"
  python3 scripts/parity_torch.py train "$D" --method "$M" --steps "$STEPS" > "$OUT/torch_${SHAPE}_$M.log" 2>&1 \
    || { echo "torch $M failed:"; tail -n 30 "$OUT/torch_${SHAPE}_$M.log"; continue; }
  tail -n 1 "$OUT/torch_${SHAPE}_$M.log"
  python3 scripts/parity_torch.py compare "$D" --method "$M" | tee -a "$OUT/parity_$SHAPE.txt" || true
  cp "$D/ftrun_$M.json" "$OUT/ftrun_${SHAPE}_$M.json"; cp "$D/torch_$M.json" "$OUT/torch_${SHAPE}_$M.json"
done
