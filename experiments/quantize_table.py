"""Uniform-bits table for the README: `python experiments/quantize_table.py --model digits16 --n 256`.

Thin entry point: calls `qpolicy quantize` logic for W3A3..W16A16 and FP, prints a Markdown table and
writes experiments/results/quantize_<model>.json."""
import argparse
import platform

import jax

from qpolicy import evaluate_schedule, load_denoiser, make_engine, reference_bank
from qpolicy.io import atomic_write_json
from qpolicy.engine import uniform_bits

p = argparse.ArgumentParser()
p.add_argument("--model", default="digits16")
p.add_argument("--n", type=int, default=256)
p.add_argument("--steps", type=int, default=10)
a = p.parse_args()
den = load_denoiser(a.model)
eng = make_engine(den, steps=a.steps)
bank = reference_bank(eng, "eval", a.n)
rows = []
print("| bits | bops_rel_fp32 | bops_rel_w8a8 | traj_error | final_error | fd |")
print("|---|---|---|---|---|---|")
for b in (3, 4, 6, 8, 16, 32):
    r = evaluate_schedule(eng, bank, *uniform_bits(eng, b, b), with_fd=True)
    r.pop("samples"), r.pop("errors")
    rows.append({"bits": b, **r})
    print(f"| W{b}A{b} | {r['bops_rel_fp32']:.4f} | {r['bops_rel_w8a8']:.3f} | {r['traj_error']:.3g} | "
          f"{r['final_error']:.3g} | {r['fd']:.3g} |", flush=True)
atomic_write_json(f"experiments/results/quantize_{a.model}.json",
                  {"model": a.model, "n": a.n, "steps": a.steps, "sampler": "ddim", "act_ranges": "dynamic",
                   "machine": f"{platform.node()} {platform.machine()} {jax.devices()[0].device_kind}", "rows": rows})
