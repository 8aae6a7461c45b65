#!/usr/bin/env bash
# H100 session (PTQ issue, second ablation pass): the rows the first post-merge call could not finish —
# patches32 under ptq+smooth / ptq+gptq / ptq+recon / full, digits16 under ptq+gptq / ptq+recon / full — each under a time cap so both
# models report (ptq_ablation.py writes its JSON after every configuration). Run from the repo root with $OUT set.
# The rows are settings: D_CONFIGS / D_BITS (digits16), P_CONFIGS / P_BITS (patches32), T1 / T2 (their time caps in s),
# TAG (the output names' suffix); experiments/gpu_session_ptq3.sh runs the third pass through them.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
TAG=${TAG:-2}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${T1:-200}" python3 experiments/ptq_ablation.py --model digits16 --n 1000 --bits "${D_BITS:-4/8,8/8}" \
  --configs "${D_CONFIGS:-ptq+gptq,ptq+recon,full}" --out "$OUT/ptq_ablation${TAG}_digits16.json" 2>&1 | grep -v it/s \
  | tee "$OUT/log_digits16.txt"
timeout "${T2:-330}" python3 experiments/ptq_ablation.py --model patches32 --n 1000 --bits "${P_BITS:-8/8,8/16,4/8}" \
  --configs "${P_CONFIGS:-ptq+smooth,ptq+gptq,ptq+recon,full}" --out "$OUT/ptq_ablation${TAG}_patches32.json" 2>&1 \
  | grep -v it/s | tee "$OUT/log_patches32.txt"
