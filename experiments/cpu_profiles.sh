#!/usr/bin/env bash
# CPU (2 cores) check of the profile action space on digits16 at the demo's scale: each step picks one of K = 4
# precision profiles (sensitivity ILP at budgets 0.016 .. 0.055 BOPs/FP32), Lagrangian JAX PPO with a batch-mean target
# of 0.03, one image per env, 3 seeds (experiments/cpu_seeds.sh). Usage (repo root): bash experiments/cpu_profiles.sh [OUT_DIR]
set -euo pipefail
bash experiments/cpu_seeds.sh experiments/configs/digits16_ppo_jax_profiles.yaml \
  "${1:-experiments/results/cpu/profiles}" profiles_lagrangian --set agent_kwargs.cost_target=0.03 --set env.lam=1.0
