"""Does reading the request pay when each request gets its own search? A non-RL upper probe for conditional models.

``request_allocation.py`` picked per-scale schedules from a menu searched for *all* requests at one cost, and found
nothing. Here every guidance scale k gets its own evolution search (``search_schedule``) on train-bank images of
that scale only, at several budgets b_j = target * ratio_j; the per-scale errors of those schedules are measured on
further train images of the scale, and one schedule per scale is chosen to minimise the mean error subject to the
mean BOPs over requests (scales equally likely) <= target (an exact multiple-choice knapsack by enumeration). Two
request-adaptive policies result: ``per_scale_equal`` (each scale's search at the target itself: specialisation
only) and ``per_scale_allocated`` (the knapsack's pick: specialisation + moving bits between requests).

Compute: the per-scale searches together spend at most the forwards of the run's own ``search_evolution`` (equal
compute; the shared sensitivity table is not counted, as in search_schedule). Scored on the run's eval bank (an
unseen noise seed) image by image (``grouped_errors`` with one image per group, so every policy runs with the same
numerics), paired per image against the run's ``search_evolution`` and its learned policy's mean schedule, with
95 % CIs. Writes a JSON to --out.

With ``--warm`` every per-scale search starts from the run's ``search_evolution`` schedule (repaired to its budget),
which also stands unsearched as each scale's ratio-1 option: a refinement that spends ``--compute`` forwards on
top of the run's search (report both).

Usage: python experiments/request_search.py --run RUN_DIR --out FILE.json [--n 512] [--eval-seed 5000]
       [--ratios 0.7,1,1.4] [--search-images 24] [--select-images 32] [--warm --compute 80000]
"""
import argparse
import itertools
import json
import time

import numpy as np

import conditional_run  # experiments/conditional_run.py (the script's own folder)

from qpolicy.agents.budget import schedule_cost
from qpolicy.agents.search import search_schedule
from qpolicy.agents.sensitivity import layer_sensitivity
from qpolicy.banks import ReferenceBank, reference_bank
from qpolicy.conditioning import request_table
from qpolicy.io import atomic_write_text
from qpolicy.schedule_eval import grouped_errors
from qpolicy.stats import mean_ci, paired_difference

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--run", required=True)
p.add_argument("--n", type=int, default=512)
p.add_argument("--eval-seed", type=int, default=5000)
p.add_argument("--ratios", default="0.7,1,1.4", help="per-scale search budgets as multiples of the target")
p.add_argument("--search-images", type=int, default=24, help="train images per scale each search scores on")
p.add_argument("--select-images", type=int, default=32, help="further train images per scale for the knapsack")
p.add_argument("--population", type=int, default=8)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--compute", type=int, default=None,
               help="forwards all per-scale searches may spend together (default: the run's search_evolution's)")
p.add_argument("--warm", action="store_true",
               help="seed every per-scale search with the run's search_evolution schedule, which also stands as each "
                    "scale's ratio-1 entry unsearched (then --compute is spent on top of the run's search)")
p.add_argument("--target", type=float, default=None, help="mean BOPs/FP32 over requests (default: the learned cost)")
p.add_argument("--out", required=True)
a = p.parse_args()
t0 = time.time()
r = conditional_run.load(a.run, a.n, a.eval_seed, a.target)
s, eng, cond, ev, z, target = r.s, r.eng, r.cond, r.ev, r.z, r.target
pol = {q["name"]: q for q in ev["policies"]}
compute = a.compute or int(pol["search_evolution"]["search_forwards"])
ratios = [float(r) for r in a.ratios.split(",")]
scales = np.asarray(cond.guidance_scales, float)
K, S = len(scales), eng.num_steps
per = a.search_images + a.select_images
tb = reference_bank(eng, "train", 3 * per * K)  # enough draws that every scale has `per` images
scale_of = np.searchsorted(scales, request_table(cond, tb.keys)["guidance"])
sel = {k: np.flatnonzero(scale_of == k)[:per] for k in range(K)}
short = [float(scales[k]) for k in range(K) if len(sel[k]) < per]
if short:
    raise SystemExit(f"the train bank has fewer than {per} images of guidance scales {short}")
part = lambda k, lo, hi: ReferenceBank(name=f"train[s={scales[k]}]", keys=tb.keys[sel[k][lo:hi]],  # noqa: E731
                                       traj=tb.traj[:, sel[k][lo:hi]])
sens = layer_sensitivity(eng, tb, max_images=16)
glob = (z["search_evolution__w"], z["search_evolution__a"])
searched = [j for j, r in enumerate(ratios) if not (a.warm and r == 1.0)]
per_search = compute // (K * len(searched))
gens = max(0, per_search // (a.population * a.search_images * S) - 1)
found, spent = {}, 0
for k in range(K):
    for j in set(range(len(ratios))) - set(searched):
        found[k, j] = glob
for k, j in itertools.product(range(K), searched):
    r = ratios[j]
    b = search_schedule(eng, part(k, 0, a.search_images), target * r, generations=gens, population=a.population,
                        seed=a.seed + 100 * k + j, sens=sens, init=[glob] if a.warm else ())
    found[k, j] = (b.bits_w, b.bits_a)
    spent += int(b.info["forwards"])
    print(f"scale {scales[k]} budget {target * r:.4f}: train score {b.info['best_score']:.5f} "
          f"({b.info['evaluations']} evaluations)", flush=True)
# per-scale errors of each scale's schedules on the selection images (not seen by the searches)
E = np.zeros((K, len(ratios)))
cost = np.array([[schedule_cost(eng, *found[k, j]) for j in range(len(ratios))] for k in range(K)])
for k, j in itertools.product(range(K), range(len(ratios))):
    bk = part(k, a.search_images, per)
    e, _ = grouped_errors(eng, bk, np.arange(bk.size).reshape(-1, 1), *(np.stack([x] * bk.size) for x in found[k, j]))
    E[k, j] = e[-1].mean()
pk = np.full(K, 1 / K)
best = min((c for c in itertools.product(range(len(ratios)), repeat=K)
            if float(pk @ cost[np.arange(K), list(c)]) <= target + 1e-9),
           key=lambda c: float(pk @ E[np.arange(K), list(c)]))
equal = [ratios.index(1.0)] * K if 1.0 in ratios else None
ek = np.searchsorted(scales, request_table(cond, s.bank.keys)["guidance"])
idx = np.arange(s.n).reshape(-1, 1)


def per_image(pick):
    bw = np.stack([found[k, pick[k]][0] for k in ek])
    ba = np.stack([found[k, pick[k]][1] for k in ek])
    return grouped_errors(eng, s.bank, idx, bw, ba)[0][-1], float(cost[ek, [pick[k] for k in ek]].mean())


def static(name):
    w, b = z[name + "__w"], z[name + "__a"]
    return grouped_errors(eng, s.bank, idx, np.stack([w] * s.n), np.stack([b] * s.n))[0][-1], schedule_cost(eng, w, b)


mine = {"per_scale_allocated": per_image(best)}
if equal is not None:
    mine["per_scale_equal"] = per_image(equal)
others = {k: static(k) for k in ("search_evolution", f"learned_{s.cfg.agent}_mean_schedule")}
by_scale = lambda v: {str(g): float(v[ek == i].mean()) for i, g in enumerate(scales)}  # noqa: E731
out = {"run": str(a.run), "model": eng.den.name, "n": s.n, "eval_seed": s.eval_seed, "target_bops_rel_fp32": target,
       "ratios": ratios, "search_images": a.search_images, "select_images": a.select_images,
       "generations": gens, "population": a.population, "warm": a.warm, "forwards_spent": spent,
       "search_evolution_forwards": compute,
       "select_error": {str(g): dict(zip(map(str, ratios), E[i].round(6).tolist())) for i, g in enumerate(scales)},
       "select_cost": {str(g): dict(zip(map(str, ratios), cost[i].round(5).tolist())) for i, g in enumerate(scales)},
       "pick": {str(g): ratios[best[i]] for i, g in enumerate(scales)},
       "policies": {k: {"bops_rel_fp32": c, "final_error": mean_ci(v), "by_scale": by_scale(v),
                        "vs": {o: {x: paired_difference(v, ov)[x] for x in ("mean_diff", "ci", "rel_diff", "verdict")}
                               for o, (ov, _) in others.items()}}
                    for k, (v, c) in mine.items()},
       "baselines": {k: {"bops_rel_fp32": c, "final_error": mean_ci(v), "by_scale": by_scale(v)}
                     for k, (v, c) in others.items()},
       "seconds": time.time() - t0}
atomic_write_text(a.out, json.dumps(out, indent=1))
print(json.dumps({k: out[k] for k in ("pick", "policies", "baselines", "forwards_spent")}, indent=1))
