#!/usr/bin/env bash
# Policy runs on the lent H100: train JAX PPO on digits16 and patches32, evaluate each against all
# baselines at matched cost.
set -uo pipefail
OUT=${OUT:-out/gpu}
Q="python -P -m qpolicy.cli"  # -P: import the installed package, not ./qpolicy
DEV="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
$Q train --config experiments/configs/digits16_ppo_jax_gpu.yaml --run-dir "$OUT/runs/digits16_ppo_jax_gpu" --wandb disabled
$Q evaluate --run "$OUT/runs/digits16_ppo_jax_gpu"
$Q train --config experiments/configs/patches32_ppo_jax.yaml --run-dir "$OUT/runs/patches32_ppo_jax" --wandb disabled
$Q evaluate --run "$OUT/runs/patches32_ppo_jax"
