#!/usr/bin/env bash
# H100 (evaluation issue): three JAX PPO seeds per model on the default engine, each evaluated on N = 512 images of a
# noise seed never used in training or fitting (5000) against the full baseline set at the learned policy's BOPs
# and at equal compute (every search capped at the schedules the run's training forwards pay for), with the
# adaptivity audit; then the seed report. Resumable across calls: policies already under
# experiments/results/h100/seeds/runs_MODEL are reused (no retraining), and a seed whose eval/evaluation.json
# already holds this setting is skipped, so a cut call is continued by the next one.
# Usage (repo root, wheels installed, $OUT set): bash experiments/gpu_session_seeds.sh MODEL [DEADLINE_S]
set -uo pipefail
model=$1
deadline=${2:-570}
source "$(dirname "$0")/gpu_env.sh"
declare -A CFG=([digits16]=digits16_ppo_jax_gpu [patches32]=patches32_ppo_jax)
declare -A STEPS=([digits16]=160000 [patches32]=64000)
N=512; EVAL_SEED=5000
committed=experiments/results/h100/seeds/runs_$model
runs=/tmp/runs_$model
rm -rf "$runs"
if ls "$committed"/seed2/policy >/dev/null 2>&1; then
  cp -r "$committed" "$runs"
  echo "$model: reusing the committed policies of $committed" | tee -a "$OUT/timing_$model.txt"
else
  t0=$SECONDS
  $Q train --config "experiments/configs/${CFG[$model]}.yaml" --run-dir "$runs" --seeds 0,1,2 \
     --total-timesteps "${STEPS[$model]}" --wandb disabled > "$OUT/train_$model.json"
  echo "$model: train ${STEPS[$model]} decisions x 3 seeds $((SECONDS - t0)) s" | tee -a "$OUT/timing_$model.txt"
  tar czf "$OUT/trained_$model.tgz" -C /tmp "runs_$model"  # the policies come back even if evaluation is cut
fi
done_already() {  # evaluation.json of this setting present?
  python3 - "$1/eval/evaluation.json" <<EOF
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    ok = d["eval_n"] == $N and d["eval_seed"] == $EVAL_SEED and d["search_budget"]["mode"] == "equal"
except Exception:
    ok = False
sys.exit(0 if ok else 1)
EOF
}
for s in 0 1 2; do
  run="$runs/seed$s"
  if done_already "$run"; then echo "$model seed$s: evaluated already"; continue; fi
  left=$((deadline - SECONDS - 40))
  [ "$left" -lt 60 ] && { echo "$model seed$s: no time left ($left s)" | tee -a "$OUT/timing_$model.txt"; break; }
  t0=$SECONDS
  timeout "$left" $Q evaluate --run "$run" --n $N --eval-seed $EVAL_SEED --baselines all --search-budget equal 2>&1 \
     | grep --line-buffered -v "it/s\|s/it\|^\s*$" > "$OUT/evaluate_${model}_seed$s.txt"
  echo "$model seed$s: evaluation rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$OUT/timing_$model.txt"
done
$Q report "$runs" --out "$runs/report" --skip-unevaluated > /dev/null 2>&1 && echo "$model: report written"
tar czf "$OUT/runs_$model.tgz" -C /tmp "runs_$model"
