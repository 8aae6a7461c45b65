#!/usr/bin/env bash
# Follow-up H100 session: re-evaluate the patches32 policy against the baselines after the sensitivity
# probes were extended above the 8-bit base, and train + evaluate the layer-wise JAX PPO on digits16.
set -uo pipefail
OUT=${OUT:-out/gpu}
Q="python -P -m qpolicy.cli"
mkdir -p "$OUT/runs"
cp -r experiments/results/h100/patches32_ppo_jax "$OUT/runs/patches32_ppo_jax" && rm -rf "$OUT/runs/patches32_ppo_jax/eval"
$Q evaluate --run "$OUT/runs/patches32_ppo_jax"
$Q train --config experiments/configs/digits16_layerwise_ppo_jax.yaml --run-dir "$OUT/runs/digits16_layerwise_ppo_jax" --wandb disabled
$Q evaluate --run "$OUT/runs/digits16_layerwise_ppo_jax"
