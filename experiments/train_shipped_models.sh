#!/usr/bin/env bash
# How the shipped denoisers and the patches feature network were trained (on the lent H100).
# Usage: OUT=/some/dir bash experiments/train_shipped_models.sh   (writes checkpoints under $OUT)
set -euo pipefail
OUT=${OUT:-out/shipped}
Q="python -m qpolicy.cli"
export WANDB_MODE=${WANDB_MODE:-offline}
$Q denoiser train --data digits --preset small --steps 60000 --out "$OUT/digits16" --name digits16 \
   --wandb disabled --time-limit 140 --log-every 500 --ckpt-every 1000000
python -m qpolicy.metrics train patches --steps 4000 --no-progress
$Q denoiser train --data patches --preset medium --steps 200000 --out "$OUT/patches32" --name patches32 \
   --wandb disabled --weights-dtype float16 --time-limit 280 --log-every 500 --ckpt-every 1000000
rm -f "$OUT"/*/train_state.msgpack "$OUT/digits16/metrics.jsonl"
mkdir -p "$OUT/feat_patches" && cp qpolicy/assets/features/patches/* "$OUT/feat_patches/"
$Q denoiser eval --model "$OUT/digits16" --n 1000 --json
$Q denoiser eval --model "$OUT/patches32" --n 1000 --json
