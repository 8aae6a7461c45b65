"""``qpolicy`` commands about precision-policy runs: train, sweep, report, evaluate (and the evaluation summary,
``summary_lines``), export, deploy, demo (each ``cmd_*(args) -> exit status``; the parser is in :mod:`qpolicy.cli`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .cli_models import print_json
from .config import config_kwargs


def cmd_train(a) -> int:
    from .runs import RunConfig, load_config, train

    cfg = dataclasses.replace(load_config(a.config, a.set or []), **config_kwargs(a, RunConfig))
    run_dir = Path(a.run_dir or Path("runs") / cfg.name)
    if a.seeds:  # one run directory per seed: run_dir/seed<s>
        from .sweep import seeds_runs

        print_json(seeds_runs(a.config, a.seeds, run_dir, a.set or [], replace=config_kwargs(a, RunConfig)))
        return 0
    print_json(train(cfg, run_dir))
    return 0


def cmd_sweep(a) -> int:
    """Grid x seeds as Ray Tune trials, each a normal run directory (then evaluated)."""
    from .sweep import run_sweep

    res = run_sweep(a.config, a.grid or [], a.seeds, a.out, overrides=a.set or [], address=a.address,
                    num_cpus=a.num_cpus, gpus_per_trial=a.gpus_per_trial, evaluate=not a.no_evaluate,
                    baselines=a.baselines, eval_n=a.n, with_fd=not a.no_fd, progress=not a.json)
    print_json(res) if a.json else print(f"{sum(r.get('status') == 'ok' for r in res)}/{len(res)} trials ok; "
                                          f"results: {Path(a.out) / 'sweep.json'}")
    return 0 if all(r.get("status") == "ok" for r in res) else 1


def cmd_report(a) -> int:
    from .report import build_report

    rep = build_report(a.runs, a.out, skip_unevaluated=a.skip_unevaluated)
    print(f"wrote {Path(a.out) / 'report.md'}, {Path(a.out) / 'pareto.png'} ({len(rep.get('groups', []))} groups)")
    return 0


def cmd_evaluate(a) -> int:
    from .evaluation import evaluate_run
    from .report import expand_runs

    runs = expand_runs([a.run])  # a run directory, or a folder of them (seeds, a sweep)
    for run in runs:
        res = evaluate_run(run, baselines=a.baselines, budget=a.budget, n=a.n, eval_seed=a.eval_seed,
                           progress=not a.json, with_fd=not a.no_fd, permutations=a.permutations,
                           search_budget=a.search_budget, overwrite=a.force)
        _show_evaluation(res, a.json)
    return 0


def _show_evaluation(res: dict, as_json: bool) -> None:
    if as_json:
        print_json(res)
        return
    print(f"{'policy':<34} {'kind':<9} {'BOPs/FP32':>10} {'bits W/A':>11} {'final_err [95% CI]':>27} "
          f"{'fd':>7}  vs learned")
    for p in res["policies"]:
        ci = p["final_error_ci"]
        vs = p.get("vs_learned", {}).get("verdict", "")
        vs = {"better": "learned better", "worse": "learned worse"}.get(vs, vs)
        print(f"{p['name']:<34} {p['kind']:<9} {p['bops_rel_fp32']:>10.4f} "
              f"{p['mean_bits_w']:>5.2f}/{p['mean_bits_a']:<5.2f} {p['final_error']:>9.4g} "
              f"[{ci[0]:.4g}, {ci[1]:.4g}]".ljust(20) + f" {p.get('fd', float('nan')):>7.3g}  {vs}")
    print("\n".join(summary_lines(res)))
    print("files:", json.dumps(res["files"], indent=1))


def summary_lines(res: dict) -> list[str]:
    """The CI-backed verdict and the adaptivity audit of an evaluation, in a few lines."""
    out = []
    if "best_baseline_at_matched_cost" in res:
        b = res["best_baseline_at_matched_cost"]
        out.append(f"vs best baseline at <= the learned cost: {b['text']}")
    ad = res.get("adaptivity", {})
    if ad:
        from .stats import verdict_text

        out.append("vs its own static mean schedule: " + verdict_text(ad["vs_mean_schedule"], "learned",
                                                                        "its mean schedule"))
        if ad.get("gain") is not None:
            lo, hi = ad["gain_ci"]
            out.append(f"input dependence (each group's schedule on other groups' images): gain {ad['gain']:+.4g} "
                       f"[{lo:+.4g}, {hi:+.4g}], p = {ad['p_value']:.3g}, "
                       f"{ad['permutation']['distinct_schedules']} distinct schedules")
        o = ad.get("oracle", {})
        if o.get("headroom") is not None:
            cap = "n/a" if o["captured"] is None else f"{100 * o['captured']:.0f} %"
            out.append(f"oracle headroom over {len(o['menu'])} static schedules: {o['best_static']} "
                       f"{o['best_static_error']:.4g} -> per-image best {o['oracle_error']:.4g} "
                       f"({100 * (o['headroom_rel'] or 0):.0f} %); learned captures {cap}")
            nf = o.get("noise_floor") or {}
            if nf.get("headroom_rel") is not None:
                out.append(f"  its noise floor: {o['best_static']} run image by image (other float rounding) "
                           f"gives {nf['distinct']} distinct copies whose per-image best is "
                           f"{100 * nf['headroom_rel']:.0f} % below their mean: luck, not adaptivity")
        ln = ad.get("learnable", {})
        if ln.get("gain_rel") is not None:
            out.append(f"learnable from x_T features (ridge, held-out half): {100 * ln['gain_rel']:+.1f} % vs "
                       f"{ln['best_static']} ({ln['vs_best_static']['verdict']})")
        for r in ad.get("by_request", {}).get("scales", []):
            vs = r.get("learned_vs_best_static") or r["learned_vs_mean_schedule"]
            which = "the best static" if "learned_vs_best_static" in r else "its mean schedule"
            out.append(f"guidance {r['guidance']:g} ({r['n']} images): learned BOPs/FP32 "
                       f"{r['learned_bops_rel_fp32']:.4f}, error {r['learned_error']['mean']:.4g} vs {which} "
                       f"{r.get('best_static_error', r['mean_schedule_error']):.4g} ({vs['verdict']})")
    rec = res.get("recommendation")
    if rec:
        kind = "a static schedule" if rec["static"] else "input-dependent"
        out.append(f"what the evidence supports: {rec['policy']} ({kind}): {rec['why']}")
    return out


def cmd_export(a) -> int:
    from .runs import export_run

    for p in export_run(a.run, a.format, a.out):
        print(p)
    return 0


def cmd_deploy_onnx(a) -> int:
    from .denoiser import load_denoiser
    from .ort_runtime import deploy
    from .schedule import BitSchedule

    if (a.run is None) == (a.schedule is None):
        raise ValueError("give --schedule FILE (a static schedule) or --run DIR (a profile-mode run), not both")
    if a.run is not None:  # per-input switching among K profile variants, picked by the policy network
        from .profile_runtime import deploy_run

        out = Path(a.out) if a.out else Path("out") / "deploy_onnx" / Path(a.run).name
        r = deploy_run(a.run, out, n=a.n, threads=a.threads, calib_n=a.calib_n)
        if a.json:
            print(json.dumps(r, indent=1))
        else:
            print(f"onnxruntime, {r['n']} images in {r['groups']} groups, {r['num_profiles']} profile variants in "
                  f"{out}; profile use {r['profile_counts']}")
            print(f"final_error {r['final_error']:.4g} (vs FP sampler); final_error_vs_simulation "
                  f"{r['final_error_vs_simulation']:.4g}; mean cost_rel_fp32 {r['mean_cost_rel_fp32']:.4g}")
        return 0
    sched = BitSchedule.load(a.schedule)
    den = load_denoiser(a.model or sched.model_id)
    out = Path(a.out) if a.out else Path("out") / "deploy_onnx" / Path(a.schedule).stem
    r = deploy(den, sched, out, n=a.n, threads=a.threads, repeats=a.repeats, calib_n=a.calib_n)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"onnxruntime, {r['n']} images, {len(r['segments'])} segment models in {out}")
        print(f"final_error {r['final_error']:.4g} (vs FP sampler); final_error_vs_simulation "
              f"{r['final_error_vs_simulation']:.4g}; rounded entries {len(r['rounding'])}")
        print(f"denoiser seconds: FP ONNX {r['seconds_fp_onnx']:.3f}, quantized {r['seconds_quantized_onnx']:.3f}")
    return 0


def cmd_demo(a) -> int:
    """Main job: train a PPO precision policy on digits16, evaluate it against every baseline, export it."""
    from .evaluation import evaluate_run
    from .runs import RunConfig, export_run, load_config, train

    out = Path(a.out)
    cfg = dataclasses.replace(load_config(a.config, a.set or []), **config_kwargs(a, RunConfig))
    summary = train(cfg, out)
    res = evaluate_run(out, baselines="all")
    paths = export_run(out, "json", out / "export" / "schedule.json") + \
        export_run(out, "csv", out / "export" / "schedule.csv")
    learned = res["policies"][0]
    print(f"\ntrained {summary['agent']} for {summary['timesteps']} decisions in {summary['wall_s']:.0f}s")
    lo, hi = learned["final_error_ci"]
    print(f"learned policy: BOPs/FP32 {learned['bops_rel_fp32']:.4f}, final error {learned['final_error']:.4g} "
          f"[{lo:.4g}, {hi:.4g}] on {res['eval_n']} eval images (seed {res['eval_seed']})")
    spread = learned.get("bops_rel_fp32_spread")
    if spread:
        print(f"its cost across inputs: std {spread['std']:.4f}, {spread['min']:.4f} .. {spread['max']:.4f} "
              f"over {spread['groups']} input groups")
    print("\n".join(summary_lines(res)))
    for k, v in res["files"].items():
        print(f"{k:>10}: {v}")
    for p in paths:
        print(f"    export: {p}")
    return 0
