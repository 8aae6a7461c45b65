#!/usr/bin/env bash
# CPU (2 cores), the demo's scale: one config trained for 3 seeds, each evaluated on 64 images of the unseen noise seed
# 5000 against the fast baselines with the adaptivity audit, then the report.
# Usage (repo root): bash experiments/cpu_seeds.sh CONFIG OUT_DIR RUN_NAME [--set k=v ...]
set -euo pipefail
cfg=$1 out=$2 name=$3
shift 3
Q=".venv/bin/qpolicy"
t0=$SECONDS
$Q train --config "$cfg" --run-dir "$out/$name" --seeds 0,1,2 --wandb disabled "$@" > /dev/null
echo "trained 3 seeds in $((SECONDS - t0)) s"
t0=$SECONDS
$Q evaluate --run "$out/$name" --n 64 --eval-seed 5000 --baselines fast --no-fd --json > /dev/null
echo "evaluated in $((SECONDS - t0)) s"
$Q report "$out/$name" --out "$out/report" > /dev/null
echo "report: $out/report/report.md"
