"""PTQ ablation table (issue: a quantizer as good as the literature's): uniform bits under each quantizer
configuration, for the README. Thin entry point over qpolicy.engine.

    python experiments/ptq_ablation.py --model digits16 --n 1000 [--out experiments/results/ptq_ablation_digits16.json]

Configurations: plain (the engine before the PTQ toolbox), +split (shortcut splitting), +bias (bias correction),
+clip (weight MSE clipping search), ptq (all three), then on top of ptq: +pct (percentile activation ranges),
+amse (MSE activation clipping per layer, step bucket and bit choice), +smooth (SmoothQuant scale migration; the
ptq-smooth preset), +recon (AdaRound at 4-6 weight bits; the ptq-recon preset), +oclip (output-aware weight clipping
search at <= 8 weight bits), +oclip+recon (AdaRound on the output-aware grid), +gptq / +oclip+gptq (GPTQ instead of
AdaRound; +gptq is the ptq-gptq preset), and every further named preset
(QUANT_PRESETS: full). ``--configs a,b`` runs a subset (e.g. on a CPU). Each row: final error with its 95 %
bootstrap CI over images, FD of the samples (the model's feature network), cost, and the engine's setup seconds
(calibration: splits, input means, clipping search)."""
import argparse
import platform
import time

import jax
import numpy as np

from qpolicy import load_denoiser, make_engine, reference_bank, uniform_bits
from qpolicy.engine import QUANT_PRESETS, evaluate_schedule, quant_config
from qpolicy.features import load_feature_extractor
from qpolicy.io import atomic_write_json
from qpolicy.metrics import real_reference, sample_quality
from qpolicy.stats import mean_ci

p = argparse.ArgumentParser()
p.add_argument("--model", default="digits16")
p.add_argument("--n", type=int, default=1000)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--bits", default="4/8,6/6,8/8,4/16,8/16,16/16")
p.add_argument("--configs", default=None, help="comma-separated subset of the configurations (default: all)")
p.add_argument("--keep-ends", type=int, default=None,
               help="also run each pair with the first and last layers at >= this many bits (rows 'ends<B>')")
p.add_argument("--eval-seed", type=int, default=None, help="eval bank noise seed (default: the eval bank's own)")
p.add_argument("--out", default=None)
a = p.parse_args()
den = load_denoiser(a.model)
off = QUANT_PRESETS["plain"]
ptq = QUANT_PRESETS["ptq"]
configs = {"plain": off, "+split": {**off, "split_concat": True}, "+bias": {**off, "bias_correction": True},
           "+clip": {**off, "weight_clipping": True}, "ptq": ptq, "ptq+pct": {**ptq, "act_clip": "percentile"},
           "ptq+amse": {**ptq, "act_clip": "mse"}, "ptq+smooth": {**ptq, "smoothquant": True},
           "ptq+recon": {**ptq, "reconstruction": True}, "ptq+oclip": {**ptq, "clip_objective": "output"},
           "ptq+oclip+recon": {**ptq, "clip_objective": "output", "reconstruction": True},
           "ptq+gptq": {**ptq, "reconstruction": True, "recon_method": "gptq"},
           "ptq+smooth+gptq": {**ptq, "smoothquant": True, "reconstruction": True, "recon_method": "gptq"},
           "ptq+oclip+gptq": {**ptq, "clip_objective": "output", "reconstruction": True, "recon_method": "gptq"}}
configs.update({k: v for k, v in QUANT_PRESETS.items() if v not in configs.values()})  # e.g. full
if a.configs:
    unknown = sorted(set(a.configs.split(",")) - set(configs))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; accepted: {', '.join(configs)}")
    configs = {k: configs[k] for k in a.configs.split(",")}
pairs = [tuple(int(v) for v in s.split("/")) for s in a.bits.split(",")]
ext = load_feature_extractor(den.dataset)
real, m = real_reference(den.dataset, a.n)
rf = (ext.features(real[:m]), ext.features(real[m:]))
out = a.out or f"experiments/results/ptq_ablation_{a.model}.json"


def save(rows, fd_fp, complete):
    """Written after every configuration (atomically), so a run cut by a time limit keeps the rows it finished."""
    atomic_write_json(out, {"model": a.model, "n": a.n, "steps": a.steps, "sampler": "ddim", "fd_fp": fd_fp,
                            "complete": complete,
                            "machine": f"{platform.node()} {platform.machine()} {jax.devices()[0].device_kind}",
                            "command": f"python experiments/ptq_ablation.py --model {a.model} --n {a.n}"
                                       + (f" --bits {a.bits}" if a.bits != p.get_default("bits") else "")
                                       + (f" --configs {a.configs}" if a.configs else "")
                                       + (f" --keep-ends {a.keep_ends}" if a.keep_ends else "")
                                       + (f" --eval-seed {a.eval_seed}" if a.eval_seed is not None else ""),
                            "eval_seed": a.eval_seed, "rows": rows})


rows, fd_fp = [], None
print("| config | bits | final error [95% CI] | fd | setup s |")
print("|---|---|---|---|---|")
for name, fields in configs.items():
    t0 = time.perf_counter()
    eng = make_engine(den, steps=a.steps, qcfg=quant_config("plain", **fields))
    setup_s = time.perf_counter() - t0
    bank = reference_bank(eng, "eval", a.n, seed=a.eval_seed)
    if fd_fp is None:
        fd_fp = sample_quality(np.asarray(bank.traj[-1]), den.dataset, extractor=ext, real_features=rf)["fd"]
    for (w, b), keep in ((pair, k) for pair in pairs for k in ((None, a.keep_ends) if a.keep_ends else (None,))):
        r = evaluate_schedule(eng, bank, *uniform_bits(eng, w, b, keep_ends=keep))
        fd = sample_quality(r.pop("samples"), den.dataset, extractor=ext, real_features=rf)["fd"]
        ci = mean_ci(r.pop("errors")[-1])["ci"]
        label = f"W{w}A{b}" + (f" ends{keep}" if keep else "")
        rows.append({"config": name, "w": w, "a": b, "keep_ends": keep, "final_error": r["final_error"],
                     "final_error_ci": ci, "traj_error": r["traj_error"], "fd": fd, "fd_over_fp": fd / fd_fp,
                     "bops_rel_fp32": r["bops_rel_fp32"], "setup_s": setup_s, **fields})
        print(f"| {name} | {label} | {r['final_error']:.4g} [{ci[0]:.4g}, {ci[1]:.4g}] | {fd:.4g} "
              f"({fd / fd_fp:.3f}x FP) | {setup_s:.1f} |", flush=True)
    save(rows, fd_fp, complete=False)
print(f"FP fd: {fd_fp:.4g}")
save(rows, fd_fp, complete=True)
