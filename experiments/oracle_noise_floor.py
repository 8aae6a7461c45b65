"""How much of the oracle headroom is numerical luck? The per-image oracle's noise floor.

The adaptivity audit's oracle headroom takes, per image, the best of the static schedules at the learned cost. A
quantized trajectory is a discontinuous function of float rounding: the same schedule on the same image gives a
different final error when the image is computed in a batch of another size (XLA picks other conv/matmul reduction
orders, an activation lands on the other side of a rounding boundary, and 10 sampler steps amplify it). This script
runs ONE schedule (default: the run's best baseline at matched cost) on the eval images in batches of 1, 2, 4, ...
images, and reports, per image, the best of those numerically perturbed copies of the same schedule vs their mean: an
oracle over copies that differ in nothing a policy could choose. Compare it with the audit's headroom over distinct
schedules (evaluation.json). Writes a JSON to --out.

Usage: python experiments/oracle_noise_floor.py --run RUN_DIR [--n 64] [--eval-seed 5000] [--schedule NAME] --out F
"""
import argparse
import json
import time

import numpy as np

from qpolicy.adaptivity import noise_floor
from qpolicy.evaluation import setup
from qpolicy.io import atomic_write_text
from qpolicy.schedule_eval import grouped_errors
from qpolicy.stats import mean_ci

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--run", required=True)
p.add_argument("--n", type=int, default=64)
p.add_argument("--eval-seed", type=int, default=5000)
p.add_argument("--schedule", default=None, help="a name in the run's eval/schedules.npz (default: the best baseline "
                                                  "at the learned cost)")
p.add_argument("--versus", default=None, help="a second schedule for a two-schedule oracle on the same images (default: "
                                                "the learned policy's mean schedule)")
p.add_argument("--out", required=True)
a = p.parse_args()
t0 = time.time()
s = setup(a.run, n=a.n, eval_seed=a.eval_seed)
ev = json.loads((s.run_dir / "eval" / "evaluation.json").read_text())
name = a.schedule or ev["best_baseline_at_matched_cost"]["name"]
z = np.load(s.run_dir / "eval" / "schedules.npz")
if name + "__w" not in z.files:
    raise SystemExit(f"--schedule {name!r}: not in {s.run_dir}/eval/schedules.npz; accepted: "
                     f"{sorted(k[:-3] for k in z.files if k.endswith('__w'))}")
w, ab = z[name + "__w"], z[name + "__a"]
sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= s.n and s.n % b == 0]
errs = []
for b in sizes:
    G = s.n // b
    e, _ = grouped_errors(s.engine, s.bank, np.arange(s.n).reshape(G, b), np.stack([w] * G), np.stack([ab] * G))
    errs.append(e[-1])
E = np.stack(errs)  # (copies, N) final errors of one schedule under different batchings
vs = a.versus or f"learned_{s.cfg.agent}_mean_schedule"
ev2, _ = grouped_errors(s.engine, s.bank, np.arange(s.n).reshape(s.n, 1), np.stack([z[vs + "__w"]] * s.n),
                        np.stack([z[vs + "__a"]] * s.n))
pair = np.stack([E[0], ev2[-1]])  # batch 1: the schedule and the second one
mean_copy = E.mean(1)
nf = noise_floor(E)
audit = ev.get("adaptivity") or {}
out = {"run": str(a.run), "model": s.engine.den.name, "n": s.n, "eval_seed": s.eval_seed, "schedule": name,
       "batch_sizes": sizes, "final_error_by_batch_size": dict(zip(map(str, sizes), mean_copy.tolist())),
       "final_error_ci_batch_1": mean_ci(E[0])["ci"],
       "per_image_abs_diff_vs_batch_1": {"mean": nf["abs_diff_mean"], "max": float(np.abs(E[1:] - E[0]).max())},
       "pairwise_correlation_mean": nf["correlation_mean"],
       "distinct_copies": nf["distinct"],
       "noise_oracle_headroom": nf["headroom_rel"],
       "two_schedule_oracle": {"versus": vs, "versus_final_error": float(ev2[-1].mean()),
                               "headroom": float(1 - pair.min(0).mean() / pair.mean(1).min()),
                               "correlation": float(np.corrcoef(pair)[0, 1])},
       "audit_oracle_headroom": (audit.get("oracle") or {}).get("headroom_rel"),
       "audit_menu": (audit.get("oracle") or {}).get("menu"),
       "audit_menu_error_correlation_mean": (audit.get("oracle") or {}).get("menu_error_correlation_mean"),
       "seconds": time.time() - t0}
atomic_write_text(a.out, json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
