#!/usr/bin/env bash
# CPU (2 cores) check of input adaptivity on the class-conditional digits16c, at the demo's scale: Lagrangian JAX PPO
# (batch-mean BOPs target 0.035, one image per env, warm start from the sensitivity ILP), 3 seeds, each evaluated on
# 64 images of the unseen noise seed 5000 against the fast baselines, with the adaptivity audit split by guidance
# scale; then the report. Usage (repo root): bash experiments/cpu_conditional.sh [OUT_DIR]
set -euo pipefail
out=${1:-experiments/results/cpu/conditional}
Q=".venv/bin/qpolicy"
t0=$SECONDS
$Q train --config experiments/configs/digits16c_ppo_jax_lagrangian.yaml --run-dir "$out/warm_ilp_lagrangian" \
   --seeds 0,1,2 --wandb disabled > /dev/null
echo "trained 3 seeds in $((SECONDS - t0)) s"
t0=$SECONDS
$Q evaluate --run "$out/warm_ilp_lagrangian" --n 64 --eval-seed 5000 --baselines fast --no-fd --json > /dev/null
echo "evaluated in $((SECONDS - t0)) s"
$Q report "$out/warm_ilp_lagrangian" --out "$out/report" > /dev/null
echo "report: $out/report/report.md"
