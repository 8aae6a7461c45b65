#!/usr/bin/env bash
# H100 session (PTQ issue, third pass): the rows that decide the default preset at n = 1,000 —
# digits16 W4A8/W8A8 under ptq+gptq and ptq+smooth+gptq (SmoothQuant at 8 bits, GPTQ at 4-6 weight bits),
# patches32 W8A8/W4A8 under ptq+smooth then ptq+smooth+gptq. Each model under a time cap; ptq_ablation.py writes its
# JSON after every configuration, so a cut keeps the finished rows. Run from the repo root with $OUT set.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
ln -sfn ../envs qpolicy/envs; ln -sfn ../agents qpolicy/agents
export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=disabled PYTHONUNBUFFERED=1 QPOLICY_CACHE=/tmp/qcache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${T1:-190}" python3 experiments/ptq_ablation.py --model digits16 --n 1000 --bits 4/8,8/8 \
  --configs ptq+gptq,ptq+smooth+gptq --out "$OUT/ptq_ablation3_digits16.json" 2>&1 | grep -v it/s | tee "$OUT/log_digits16.txt"
timeout "${T2:-250}" python3 experiments/ptq_ablation.py --model patches32 --n 1000 --bits 8/8,4/8 \
  --configs ptq+smooth,ptq+smooth+gptq --out "$OUT/ptq_ablation3_patches32.json" 2>&1 | grep -v it/s | tee "$OUT/log_patches32.txt"
rm -f qpolicy/envs qpolicy/agents
