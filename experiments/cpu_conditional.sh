#!/usr/bin/env bash
# CPU (2 cores) check of input adaptivity on the class-conditional digits16c (needs the checkpoint: see
# experiments/gpu_conditional.sh) at the demo's scale: Lagrangian JAX PPO (batch-mean BOPs target 0.035, one image per
# env, warm start from the sensitivity ILP), 3 seeds (experiments/cpu_seeds.sh); the audit is split by guidance scale.
# Usage (repo root): bash experiments/cpu_conditional.sh [OUT_DIR]
set -euo pipefail
bash experiments/cpu_seeds.sh experiments/configs/digits16c_ppo_jax_lagrangian.yaml \
  "${1:-experiments/results/cpu/conditional}" warm_ilp_lagrangian
