#!/usr/bin/env bash
# The GPU benchmark session (one H100 call): env throughput (digits16, patches32), agent throughput,
# and the patches32 uniform-bits table. Results land in $OUT (copied to benchmarks/results/ afterwards).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
DEV="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
python benchmarks/env_throughput.py --model digits16 --num-envs 1 8 64 256 --out "$OUT/env_throughput_gpu_digits16.json" --device-name "$DEV"
python benchmarks/env_throughput.py --model patches32 --num-envs 1 8 64 --compile-steps 300 --out "$OUT/env_throughput_gpu_patches32.json" --device-name "$DEV"
python benchmarks/agent_throughput.py --model digits16 --num-envs 16 64 256 --timesteps 20480 --out "$OUT/agent_throughput_gpu_digits16.json" --device-name "$DEV"
# (the patches32 uniform table: python experiments/quantize_table.py --model patches32 --n 256, same session)
# per-(layer, b_w, b_a) latency tables (stored with each model as latency/<device>.json; copies in $OUT)
qpolicy latency --model digits16 --batch 64 --json && cp qpolicy/assets/models/digits16/latency/nvidia-*.json "$OUT/latency_gpu_digits16.json"
qpolicy latency --model patches32 --batch 64 --json && cp qpolicy/assets/models/patches32/latency/nvidia-*.json "$OUT/latency_gpu_patches32.json"
