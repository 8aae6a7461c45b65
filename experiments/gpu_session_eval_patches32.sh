#!/usr/bin/env bash
# H100 session, part 3: the three patches32 seeds trained in part 2 (experiments/results/h100/seeds/runs_patches32)
# evaluated on 256 images of the unseen noise seed 5000 against the non-search baselines (--baselines fast: the
# device time left did not allow the searches), then the seed report. Eval folders come back in one archive.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
ln -sfn ../envs qpolicy/envs; ln -sfn ../agents qpolicy/agents
export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=disabled PYTHONUNBUFFERED=1 QPOLICY_CACHE=/tmp/qcache
R=experiments/results/h100/seeds/runs_patches32
for s in 0 1 2; do
  timeout 110 python3 -m qpolicy.cli evaluate --run "$R/seed$s" --n 256 --eval-seed 5000 --baselines fast 2>&1 \
    | grep --line-buffered -v "it/s\|s/it" | tee "$OUT/evaluate_seed$s.txt" | tail -8
done
python3 -m qpolicy.cli report "$R" --out "$OUT/report" --skip-unevaluated
tar czf "$OUT/evals.tgz" $R/seed*/eval
rm -f qpolicy/envs qpolicy/agents
