#!/usr/bin/env bash
# Second H100 session for patches32: continue from the shipped weights (fresh AdamW), then evaluate.
set -euo pipefail
OUT=${OUT:-out/shipped}
Q="python -m qpolicy.cli"
$Q denoiser train --data patches --preset medium --steps 200000 --out "$OUT/patches32" --name patches32 \
   --wandb disabled --weights-dtype float16 --time-limit 400 --log-every 500 --ckpt-every 1000000 \
   --init-from patches32 --lr 1e-4
rm -f "$OUT"/*/train_state.msgpack
$Q denoiser eval --model "$OUT/patches32" --n 1000 --json
$Q denoiser eval --model patches32 --n 1000 --json
