#!/usr/bin/env bash
# H100 session, part 1 (PTQ issue): the ablation table of the PTQ toolbox on both shipped models (n = 1,000,
# with FD) and the integer-path fidelity check on digits16. Run from the repo root with $OUT set; on the
# offline GPU image the wheels of ../shared/gpu/wheels.sh are installed first and the package is imported from
# the tree (qpolicy/envs and qpolicy/agents linked to the top-level folders, as the installed package maps them).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 experiments/ptq_ablation.py --model digits16 --n 1000 --out "$OUT/ptq_ablation_digits16.json" 2>&1 | grep -v it/s
python3 experiments/ptq_ablation.py --model patches32 --n 1000 --out "$OUT/ptq_ablation_patches32.json" 2>&1 | grep -v it/s
python3 -m qpolicy.cli fidelity --model digits16 --w 8 --a 8 --n 64 --json > "$OUT/fidelity_digits16_w8a8.json"
python3 -m qpolicy.cli fidelity --model patches32 --w 8 --a 8 --n 16 --json > "$OUT/fidelity_patches32_w8a8.json"
tail -c 600 "$OUT/fidelity_digits16_w8a8.json"
