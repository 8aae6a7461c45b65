"""Does reading the request pay on a conditional model? A non-RL, request-conditioned allocation probe.

For a committed conditional run (e.g. digits16c), every static schedule its evaluation scored (schedules.npz: the
uniform ones, the sensitivity ILP, the searches, the learned policy's mean schedule) forms a menu. On train-bank images
the menu's final error is measured per guidance scale; then one schedule per scale is chosen to minimise the mean error
subject to the mean BOPs over requests (scales equally likely) <= the target (a multiple-choice knapsack solved by
enumeration). The chosen per-scale schedules are scored on the eval bank (unseen noise seed) and compared, paired per
image, with the best static schedule and the learned policy's mean schedule. Writes a JSON to --out.

Usage: python experiments/request_allocation.py --run RUN_DIR [--n 512] [--eval-seed 5000] [--train 128]
       [--target 0.035] --out FILE.json
"""
import argparse
import itertools
import json
import time

import numpy as np

import conditional_run  # experiments/conditional_run.py (the script's own folder)

from qpolicy.agents.budget import schedule_cost
from qpolicy.banks import reference_bank
from qpolicy.conditioning import request_table
from qpolicy.io import atomic_write_text
from qpolicy.schedule_eval import evaluate_schedule, grouped_errors
from qpolicy.stats import mean_ci, paired_difference

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--run", required=True)
p.add_argument("--n", type=int, default=512)
p.add_argument("--eval-seed", type=int, default=5000)
p.add_argument("--train", type=int, default=128, help="train-bank images the per-scale errors are measured on")
p.add_argument("--target", type=float, default=None, help="mean BOPs/FP32 over requests (default: the learned cost)")
p.add_argument("--out", required=True)
a = p.parse_args()
t0 = time.time()
r = conditional_run.load(a.run, a.n, a.eval_seed, a.target)
s, eng, cond, ev, z, target = r.s, r.eng, r.cond, r.ev, r.z, r.target
names = [k[:-3] for k in z.files if k.endswith("__w") and k[:-3] != f"learned_{s.cfg.agent}"]
menu = {k: (z[k + "__w"], z[k + "__a"]) for k in names}
cost = np.array([schedule_cost(eng, *menu[k]) for k in names])
scales = np.asarray(cond.guidance_scales, float)
tb = reference_bank(eng, "train", a.train)
tr = np.searchsorted(scales, request_table(cond, tb.keys)["guidance"])
tr_err = np.stack([evaluate_schedule(eng, tb, *menu[k])["errors"][-1] for k in names])  # (M, Ntrain)
E = np.stack([[tr_err[m][tr == k].mean() for k in range(len(scales))] for m in range(len(names))])  # (M, K)
K, pk = len(scales), np.full(len(scales), 1 / len(scales))
best = None
for combo in itertools.product(range(len(names)), repeat=K):  # M^K (M ~ 20, K = 4: 160,000)
    c = float(pk @ cost[list(combo)])
    if c <= target + 1e-9:
        e = float(sum(pk[k] * E[m, k] for k, m in enumerate(combo)))
        if best is None or e < best[0]:
            best = (e, combo)
pick = best[1]
ek = np.searchsorted(scales, request_table(cond, s.bank.keys)["guidance"])
bw = np.stack([menu[names[pick[k]]][0] for k in ek])
ba = np.stack([menu[names[pick[k]]][1] for k in ek])
err, _ = grouped_errors(eng, s.bank, np.arange(s.n).reshape(-1, 1), bw, ba)
req = err[-1]
static_best = ev["best_baseline_at_matched_cost"]["name"]
others = {k: evaluate_schedule(eng, s.bank, *menu[k])["errors"][-1]
          for k in (static_best, f"learned_{s.cfg.agent}_mean_schedule")}
out = {"run": str(a.run), "model": eng.den.name, "n": s.n, "eval_seed": s.eval_seed, "train_images": a.train,
       "target_bops_rel_fp32": target, "menu": dict(zip(names, cost.round(5).tolist())),
       "train_error_by_scale": {k: dict(zip(map(str, scales), E[m].round(6).tolist())) for m, k in enumerate(names)},
       "pick": {str(g): names[pick[k]] for k, g in enumerate(scales)},
       "request_allocation": {"bops_rel_fp32": float(cost[[pick[k] for k in ek]].mean()),
                              "final_error": mean_ci(req),
                              "by_scale": {str(g): float(req[ek == k].mean()) for k, g in enumerate(scales)}},
       "vs": {k: {**{x: paired_difference(req, v)[x] for x in ("mean_diff", "ci", "rel_diff", "verdict")},
                  "other_final_error": float(v.mean()),
                  "other_by_scale": {str(g): float(v[ek == i].mean()) for i, g in enumerate(scales)}}
              for k, v in others.items()},
       "seconds": time.time() - t0}
atomic_write_text(a.out, json.dumps(out, indent=1))
print(json.dumps({k: out[k] for k in ("pick", "request_allocation", "vs")}, indent=1))
