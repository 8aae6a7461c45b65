#!/usr/bin/env bash
# CPU (2 cores) check of the profile action space on digits16 at the demo's scale: each step picks one of K = 4
# precision profiles (sensitivity ILP at budgets 0.02 .. 0.045 BOPs/FP32), Lagrangian JAX PPO with a batch-mean target
# of 0.03, one image per env, 3 seeds, each evaluated on 64 images of the unseen noise seed 5000 against the fast
# baselines, then the report. Usage (repo root): bash experiments/cpu_profiles.sh [OUT_DIR]
set -euo pipefail
out=${1:-experiments/results/cpu/profiles}
Q=".venv/bin/qpolicy"
t0=$SECONDS
$Q train --config experiments/configs/digits16_ppo_jax_profiles.yaml --run-dir "$out/profiles_lagrangian" \
   --seeds 0,1,2 --wandb disabled --set agent_kwargs.cost_target=0.03 --set env.lam=1.0 > /dev/null
echo "trained 3 seeds in $((SECONDS - t0)) s"
t0=$SECONDS
$Q evaluate --run "$out/profiles_lagrangian" --n 64 --eval-seed 5000 --baselines fast --no-fd --json > /dev/null
echo "evaluated in $((SECONDS - t0)) s"
$Q report "$out/profiles_lagrangian" --out "$out/report" > /dev/null
echo "report: $out/report/report.md"
