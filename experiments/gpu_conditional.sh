#!/usr/bin/env bash
# H100 (adaptivity issue): the class-conditional digits model and learned policies on it.
#   phase "train": train digits16c (classifier-free guidance, label dropout 0.1) into qpolicy/assets/models/digits16c,
#     FD/KID of its FP samples, then 3 seeds of the Lagrangian JAX PPO (experiments/configs/digits16c_*.yaml);
#     the checkpoint and the policies come back as tarballs.
#   phase "eval": each seed evaluated on N = 512 images of the unseen noise seed 5000, all baselines at the learned
#     policy's BOPs and at equal compute, the adaptivity audit; the seed report.
# Usage (repo root, wheels installed, $OUT set): bash experiments/gpu_conditional.sh train|eval [DEADLINE_S]
set -uo pipefail
phase=$1
deadline=${2:-570}
source "$(dirname "$0")/gpu_env.sh"
M=qpolicy/assets/models/digits16c
runs=/tmp/runs_digits16c
committed=experiments/results/h100/conditional/runs_digits16c
N=512; EVAL_SEED=5000
if [ "$phase" = train ]; then
  if [ ! -f "$M/meta.json" ]; then
    t0=$SECONDS
    $Q denoiser train --data digits --preset small --steps 60000 --out "$M" --name digits16c --conditional true \
       --wandb disabled --time-limit 150 --log-every 1000 --ckpt-every 1000000 --weights-dtype float16 2>&1 \
       | grep -v "step/s\|s/step" | tail -3
    rm -f "$M/train_state.msgpack" "$M/metrics.jsonl"
    echo "digits16c: trained in $((SECONDS - t0)) s" | tee -a "$OUT/timing.txt"
    tar czf "$OUT/digits16c_model.tgz" "$M"
    $Q denoiser eval --model "$M" --n 1000 --json > "$OUT/digits16c_eval.json" 2>/dev/null
    echo "digits16c eval rc $?" | tee -a "$OUT/timing.txt"
  fi
  t0=$SECONDS
  timeout $((deadline - SECONDS - 30)) $Q train --config experiments/configs/digits16c_ppo_jax_lagrangian_gpu.yaml \
     --run-dir "$runs" --seeds 0,1,2 --wandb disabled > "$OUT/train_digits16c.json" 2> "$OUT/train_digits16c.err"
  echo "digits16c policies: rc $? in $((SECONDS - t0)) s" | tee -a "$OUT/timing.txt"
  tail -c 3000 "$OUT/train_digits16c.err" | grep -v "it/s" | tail -20
  tar czf "$OUT/runs_digits16c_trained.tgz" -C /tmp runs_digits16c
else
  rm -rf "$runs"; cp -r "$committed" "$runs"
  for s in 0 1 2; do
    left=$((deadline - SECONDS - 40))
    [ "$left" -lt 60 ] && { echo "seed$s: no time left ($left s)" | tee -a "$OUT/timing.txt"; break; }
    [ -f "$runs/seed$s/eval/evaluation.json" ] && { echo "seed$s: evaluated already"; continue; }
    t0=$SECONDS
    timeout "$left" $Q evaluate --run "$runs/seed$s" --n $N --eval-seed $EVAL_SEED --baselines all \
       --search-budget equal 2>&1 | grep --line-buffered -v "it/s\|s/it\|^\s*$" > "$OUT/evaluate_seed$s.txt"
    echo "seed$s: evaluation rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$OUT/timing.txt"
  done
  $Q report "$runs" --out "$runs/report" --skip-unevaluated > /dev/null 2>&1 && echo "report written"
  tar czf "$OUT/runs_digits16c.tgz" -C /tmp runs_digits16c
fi
