#!/usr/bin/env bash
# CPU (2 cores) check of the adaptivity issue's first two levers on digits16, at the demo's scale: the demo config
# (JAX PPO from scratch, lam 3) vs the same run warm-started from the sensitivity ILP at BOPs/FP32 0.03, vs the
# warm start with a Lagrangian batch-mean target of 0.03. Three seeds each; every seed evaluated on 64 images of
# the unseen noise seed 5000 against the fast baselines (no per-(layer, step) search), with the adaptivity audit;
# then one report over all. Usage (repo root): bash experiments/cpu_warm_start.sh [OUT_DIR]
set -euo pipefail
out=${1:-experiments/results/cpu/warm_start}
Q=".venv/bin/qpolicy"
cfg=experiments/configs/digits16_ppo_jax.yaml
declare -A SETS=(
  [scratch]=""
  [warm_ilp]="--set agent_kwargs.warm_start=ilp --set env.budget=0.03"
  [warm_ilp_lagrangian]="--set agent_kwargs.warm_start=ilp --set agent_kwargs.cost_target=0.03 --set env.lam=1.0"
)
for v in scratch warm_ilp warm_ilp_lagrangian; do
  t0=$SECONDS
  # shellcheck disable=SC2086
  $Q train --config "$cfg" --run-dir "$out/$v" --seeds 0,1,2 --wandb disabled ${SETS[$v]} > /dev/null
  echo "$v: trained 3 seeds in $((SECONDS - t0)) s"
  t0=$SECONDS
  $Q evaluate --run "$out/$v" --n 64 --eval-seed 5000 --baselines fast --no-fd --json > /dev/null
  echo "$v: evaluated in $((SECONDS - t0)) s"
done
$Q report "$out/scratch" "$out/warm_ilp" "$out/warm_ilp_lagrangian" --out "$out/report" > /dev/null
echo "report: $out/report/report.md"
