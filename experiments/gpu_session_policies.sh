#!/usr/bin/env bash
# H100 session, part 2 (evaluation issue): JAX PPO on digits16 and patches32, 3 seeds each, on the default (ptq)
# engine; every seed evaluated on N = 512 images of a noise seed never used in training or fitting (5000) against
# the full baseline set at the learned policy's BOPs and at equal compute (each search capped at the schedules
# the run's training forwards pay for); then the seed report. Each model's runs are packed into one archive.
# Usage: OUT=... bash experiments/gpu_session_policies.sh [digits16|patches32 ...]
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
ln -sfn ../envs qpolicy/envs; ln -sfn ../agents qpolicy/agents
export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=disabled PYTHONUNBUFFERED=1 QPOLICY_CACHE=/tmp/qcache
Q="python3 -m qpolicy.cli"
declare -A CFG=([digits16]=digits16_ppo_jax_gpu [patches32]=patches32_ppo_jax)
declare -A STEPS=([digits16]=160000 [patches32]=64000)
models=("$@"); [ ${#models[@]} -eq 0 ] && models=(digits16 patches32)
for model in "${models[@]}"; do
  runs="$OUT/runs_$model"
  t0=$(date +%s)
  $Q train --config "experiments/configs/${CFG[$model]}.yaml" --run-dir "$runs" --seeds 0,1,2 \
     --total-timesteps "${STEPS[$model]}" --wandb disabled > "$OUT/train_$model.json"
  t1=$(date +%s)
  tar czf "$OUT/trained_$model.tgz" -C "$OUT" "runs_$model"  # the policies come back even if evaluation is cut
  # measured on the H100 (2026-11-25): training fits in a 10-minute call, evaluation of 3 seeds does not; give it
  # a call of its own (patches32, n = 256, --baselines fast: > 110 s per seed)
  $Q evaluate --run "$runs" --n 512 --eval-seed 5000 --baselines all --search-budget equal 2>&1 \
     | grep --line-buffered -v "it/s\|s/it" | grep --line-buffered -v "^\s*$" > "$OUT/evaluate_$model.txt"
  t2=$(date +%s)
  $Q report "$runs" --out "$runs/report"
  echo "$model: train ${STEPS[$model]} decisions x 3 seeds $((t1 - t0)) s, evaluation $((t2 - t1)) s" | tee -a "$OUT/timing.txt"
  tar czf "$OUT/runs_$model.tgz" -C "$OUT" "runs_$model" && rm -rf "$runs"
done
rm -f qpolicy/envs qpolicy/agents
