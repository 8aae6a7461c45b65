#!/usr/bin/env bash
# H100 session (throughput issue): where the quantized env step spends its time, and whether per-env convolutions
# as batched GEMMs or a loop (env.batched_conv: im2col, map) beat JAX's grouped-convolution rule. Run from the repo root with $OUT set
# (wheels installed under /tmp/site). PART=profile | throughput | latency picks one part per device call.
set -uo pipefail
source "$(dirname "$0")/../experiments/gpu_env.sh"
DEV="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
case "${PART:-profile}" in
  profile)
    FAST="engine_step_xla engine_step_im2col engine_step_map env_step"
    timeout 270 python3 benchmarks/env_step_profile.py --model digits16 --num-envs 64 256 1024 --steps 10 \
      --pieces $FAST --out "$OUT/env_step_profile_gpu_digits16.json" --device-name "$DEV"
    timeout 270 python3 benchmarks/env_step_profile.py --model patches32 --num-envs 256 1024 --steps 5 \
      --pieces $FAST --out "$OUT/env_step_profile_gpu_patches32.json" --device-name "$DEV" ;;
  throughput)
    for impl in ${IMPLS:-xla im2col map}; do
      timeout "${T_D:-150}" python3 benchmarks/env_throughput.py --model digits16 --num-envs 1 64 256 1024 --steps 20 \
        --compile-steps 200 --batched-conv "$impl" --out "$OUT/env_throughput_gpu_digits16_$impl.json" --device-name "$DEV"
      timeout "${T_P:-150}" python3 benchmarks/env_throughput.py --model patches32 --num-envs 1 64 256 1024 --steps 10 \
        --compile-steps 100 --batched-conv "$impl" --out "$OUT/env_throughput_gpu_patches32_$impl.json" --device-name "$DEV"
    done ;;
  latency)
    for m in digits16 patches32; do
      timeout 200 $Q latency --model $m --batch 64 --json --out "$OUT/latency_gpu_$m.json" | tail -5
    done ;;
esac
