"""The ``qpolicy`` command line. Thin: parse arguments, call the library, print or write results."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import add_config_args, check, check_memory, config_kwargs

os.environ.setdefault("WANDB_MODE", "offline")


def _int_at_least(lo: int):
    """argparse type: an integer >= lo (argparse turns the error into a usage line, exit 2)."""
    def conv(text: str) -> int:
        try:
            return check("value", int(text), kind="int", lo=lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
    conv.__name__ = f"integer >= {lo}"
    return conv


def _check_n(den, n: int, steps: int, *, flag: str = "--n") -> int:
    """--n against memory before any work: per image, the FP and quantized trajectories of steps + 1 states."""
    import numpy as np

    return check_memory(flag, n, int(np.prod(den.image_shape)) * 4 * 2 * (steps + 1))


def _print_json(obj) -> None:
    from .io import dumps

    print(dumps(obj, indent=2))


# ----------------------------------------------------------------------------- denoiser
def cmd_denoiser_train(a) -> int:
    from .train import TrainConfig, train_denoiser

    cfg = TrainConfig(**{"wandb": os.environ.get("WANDB_MODE", "offline"), **config_kwargs(a, TrainConfig)})
    summary = train_denoiser(cfg)
    _print_json(summary)
    return 0


def cmd_denoiser_sample(a) -> int:
    from .data import save_image_grid
    from .denoiser import generate, load_denoiser

    from .rundir import check_writable_target

    check_writable_target(a.out, what="--out")
    den = load_denoiser(a.model)
    _check_n(den, a.n, 1)
    x = generate(den, a.n, steps=a.steps, sampler=a.sampler, eta=a.eta, seed=a.seed, progress=True)
    save_image_grid(a.out, x)
    print(f"wrote {a.out} ({a.n} samples of {den.name}, {a.sampler} {a.steps} steps)")
    return 0


def cmd_denoiser_eval(a) -> int:
    from .denoiser import generate, load_denoiser
    from .metrics import sample_quality

    den = load_denoiser(a.model)
    if not den.dataset:
        raise ValueError(f"model {a.model!r} records no dataset, so there is no feature network to compare with")
    _check_n(den, a.n, 1)
    x = generate(den, a.n, steps=a.steps, sampler=a.sampler, eta=a.eta, seed=a.seed, progress=not a.json)
    res = {"model": den.name, "dataset": den.dataset, "sampler": a.sampler, "steps": a.steps,
           **sample_quality(x, den.dataset, with_train=True)}
    _print_json(res) if a.json else print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in res.items()))
    if not a.json and isinstance(res.get("kid"), float) and res["kid"] < 0:
        print("note: kid is an unbiased estimate (MMD², polynomial kernel); a value below 0 means no measurable "
              "difference from the real images at this sample size")
    return 0


def cmd_layers(a) -> int:
    from .denoiser import load_denoiser
    from .layers import format_table

    den = load_denoiser(a.model)
    if a.json:
        _print_json([{"path": l.path, "kind": l.kind, "params": l.params, "macs": l.macs,
                      "weight_shape": list(l.weight_shape), "index": l.index} for l in den.layers])
    else:
        print(f"{den.name}: layer hash {den.layer_hash}")
        print(format_table(den.layers))
    return 0


def cmd_quantize(a) -> int:
    import numpy as np

    from .banks import reference_bank
    from .engine import evaluate_schedule

    den, eng, bits = _engine_for(a)
    _check_n(den, a.n, eng.num_steps)
    bank = reference_bank(eng, a.bank, a.n, progress=True)
    res = evaluate_schedule(eng, bank, *bits, with_fd=not a.no_fd)
    res.pop("samples"), res.pop("errors")
    bad = [k for k, v in res.items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:
        raise ValueError(f"the quantized sampler gave non-finite {', '.join(bad)} ({eng.qcfg.preset}, "
                         f"{eng.qcfg.act_ranges} ranges): the bits or the model overflow")
    res = {"model": den.name, "sampler": eng.sampler.kind, "act_ranges": eng.qcfg.act_ranges, "preset": eng.qcfg.preset,
           **res}
    if a.json:
        _print_json(res)
    else:
        for k, v in res.items():
            if k != "per_step_error":
                print(f"{k:>18}: {v:.5g}" if isinstance(v, float) else f"{k:>18}: {v}")
    return 0


def _engine_for(a):
    """(denoiser, engine, (bits_w, bits_a)) for quantize / fidelity: uniform --w/--a or --schedule FILE."""
    from .denoiser import load_denoiser
    from .engine import make_engine, quant_config, uniform_bits

    from .bits import check_bits

    qcfg = quant_config(a.preset or "ptq", act_ranges=a.act_ranges or "dynamic")
    if not a.schedule:
        if a.w is None or a.a is None:
            raise ValueError("give --w and --a (uniform bits), or --schedule FILE")
        check_bits(a.w, qcfg.bit_choices, field="--w")
        check_bits(a.a, qcfg.bit_choices, field="--a")
    den = load_denoiser(a.model)
    if a.schedule:
        from .diffusion import make_sampler
        from .engine import quant_config_from_block
        from .schedule import load_schedule_for, read_bits_file

        if a.w is not None or a.a is not None:
            raise ValueError("give either --w/--a (uniform bits) or --schedule FILE, not both")
        steps = read_bits_file(a.schedule, L=len(den.layers))[0].shape[0]  # the schedule fixes T
        sched = load_schedule_for(a.schedule, den, make_sampler(den.schedule, a.sampler, steps),
                                  quantizer=qcfg.quantizer_block())
        # the schedule runs under the quantizer block it records; a flag that contradicts the block is refused
        sq = quant_config_from_block(sched.quantizer, bit_choices=sched.bit_choices, source=str(a.schedule))
        for flag, mine, theirs in (("--preset", a.preset, sq.preset), ("--act-ranges", a.act_ranges,
                                                                        sq.act_ranges)):
            if mine is not None and mine != theirs:
                raise ValueError(f"{flag} {mine} contradicts the schedule's quantizer block ({theirs}) in "
                                 f"{a.schedule}: drop {flag} to use the schedule's quantizer")
        eng = make_engine(den, steps=steps, sampler=a.sampler, qcfg=sq)
        return den, eng, (sched.bits_w, sched.bits_a)
    eng = make_engine(den, steps=a.steps, sampler=a.sampler, qcfg=qcfg)
    return den, eng, uniform_bits(eng, a.w, a.a)


def cmd_fidelity(a) -> int:
    """Integer execution (int8 operands, int32 accumulation) vs the fake-quant simulation, layer by layer."""
    from .banks import reference_bank
    from .bits import check_bits
    from .fidelity import check

    den, eng, (bw, ba) = _engine_for(a)
    _check_n(den, a.n, eng.num_steps)
    check_bits(bw, eng.qcfg.bit_choices, field="bits_w")
    check_bits(ba, eng.qcfg.bit_choices, field="bits_a")
    res = {"model": den.name, "preset": eng.qcfg.preset, **check(eng, reference_bank(eng, a.bank, a.n), bw, ba)}
    if a.json:
        _print_json(res)
        return 0
    for r in sorted(res["layers"], key=lambda r: -r["max_lsb"])[:10]:
        print(f"{r['path']:<32} {r['kind']:<6} max {r['max_lsb']:.3g} LSB ({r['max_abs']:.3g} abs)")
    print(f"{res['layers_int']}/{res['layers_total']} layers on the integer path; worst {res['worst_layer']}: "
          f"{res['max_lsb']:.3g} LSB; final error int vs simulation {res['final_error_int_vs_sim']:.3g} "
          f"(simulation vs FP {res['final_error_sim_vs_fp']:.3g})")
    return 0


def cmd_train(a) -> int:
    from .runs import RunConfig, load_config, train

    cfg = dataclasses.replace(load_config(a.config, a.set or []), **config_kwargs(a, RunConfig))
    run_dir = Path(a.run_dir or Path("runs") / cfg.name)
    if a.seeds:  # one run directory per seed: run_dir/seed<s>
        from .sweep import seeds_runs

        _print_json(seeds_runs(a.config, a.seeds, run_dir, a.set or [], replace=config_kwargs(a, RunConfig)))
        return 0
    _print_json(train(cfg, run_dir))
    return 0


def cmd_sweep(a) -> int:
    """Grid x seeds as Ray Tune trials, each a normal run directory (then evaluated)."""
    from .sweep import run_sweep

    res = run_sweep(a.config, a.grid or [], a.seeds, a.out, overrides=a.set or [], address=a.address,
                    num_cpus=a.num_cpus, gpus_per_trial=a.gpus_per_trial, evaluate=not a.no_evaluate,
                    baselines=a.baselines, eval_n=a.n, with_fd=not a.no_fd, progress=not a.json)
    _print_json(res) if a.json else print(f"{sum(r.get('status') == 'ok' for r in res)}/{len(res)} trials ok; "
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
        _print_json(res)
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


def cmd_calibrate(a) -> int:
    from .denoiser import load_denoiser
    from .io import save_npy
    from .diffusion import make_sampler
    from .engine import QuantConfig
    from .ptq import calibrate, model_calib_path

    den = load_denoiser(a.model)
    _check_n(den, a.n, a.steps)
    qcfg = QuantConfig(act_ranges="static", range_buckets=a.buckets)
    smp = make_sampler(den.schedule, a.sampler, a.steps)
    path = model_calib_path(den, smp, qcfg, a.n)
    save_npy(path, calibrate(den, smp, qcfg, n=a.n))
    print(f"static activation ranges for {den.name} ({a.sampler} {a.steps} steps, {a.buckets} buckets, "
          f"{a.n} images): {path}")
    return 0


def cmd_profiles(a) -> int:
    """Find K precision profiles (sensitivity ILP at budgets around the target) for an env config; write the file."""
    from .profiles import profiles_cli

    _print_json(profiles_cli(a)) if a.json else print("\n".join(profiles_cli(a, lines=True)))
    return 0


def cmd_latency(a) -> int:
    """Measure the per-(layer, b_w, b_a) latency table on this device; store it with the model (or --out)."""
    from .bits import DEFAULT_BIT_CHOICES, check_choices
    from .cost import CostModel
    from .denoiser import load_denoiser
    from .latency import compare, measure, model_path, save_table

    try:
        choices = [int(c) for c in a.bit_choices.split(",")] if a.bit_choices else DEFAULT_BIT_CHOICES
    except ValueError:
        raise ValueError(f"--bit-choices must be comma-separated integers, got {a.bit_choices!r}") from None
    choices = check_choices(choices, field="--bit-choices")
    den = load_denoiser(a.model)
    rec = measure(den, batch=a.batch, repeats=a.repeats, bit_choices=choices, progress=not a.json)
    rec["comparison"] = compare(rec["table"], CostModel.from_layers(den.layers, choices))
    out = save_table(rec, a.out or model_path(den))
    if a.json:
        _print_json({"path": str(out), **{k: rec[k] for k in ("model", "device", "batch", "bit_choices",
                                                              "fallback_layers", "comparison")}})
    else:
        c = rec["comparison"]
        print(f"latency table of {den.name} on {rec['device']['kind']} (batch {rec['batch']}): {out}")
        print(f"Spearman BOPs vs latency: entries {c['spearman_entries']:.3f}, within layers "
              f"{c['spearman_within_layer_mean']:.3f}")
        for k, v in c["uniform"].items():
            print(f"  uniform {k}: BOPs/FP32 {v['bops_rel_fp32']:.4f}, latency/FP32 {v['latency_rel_fp32']:.4f}")
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


def run_args(parser: argparse.ArgumentParser) -> None:
    """RunConfig's scalar fields as flags (override the YAML config; env.* and agent_kwargs.* go through --set)."""
    from .runs import RunConfig

    add_config_args(parser, RunConfig, exclude=("env", "agent_kwargs"))


def build_parser() -> argparse.ArgumentParser:
    from .export import DIR_FORMATS, FILE_FORMATS, FORMATS

    p = _Parser(prog="qpolicy", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)

    den = sub.add_parser("denoiser", help="train, sample and evaluate denoisers").add_subparsers(dest="sub",
                                                                                                 required=True)
    t = den.add_parser("train", help="train a U-Net denoiser (resumes if OUT holds a training state)")
    from .train import TrainConfig

    add_config_args(t, TrainConfig, required=("data", "preset", "steps", "out"),
                    flags={"ema_decay": "--ema", "time_limit_s": "--time-limit"},
                    defaults={"wandb": os.environ.get("WANDB_MODE", "offline")})
    t.set_defaults(fn=cmd_denoiser_train)

    def sampling_args(q, n_default):
        q.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
        q.add_argument("--n", type=_int_at_least(1), default=n_default, help="images to sample")
        q.add_argument("--steps", type=_int_at_least(1), default=20, help="sampler steps")
        q.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="sampler")
        q.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
        q.add_argument("--seed", type=_int_at_least(0), default=0, help="noise seed")

    s = den.add_parser("sample", help="write a sample grid PNG")
    sampling_args(s, 64)
    s.add_argument("--out", required=True, help="PNG file of the sample grid")
    s.set_defaults(fn=cmd_denoiser_sample)
    e = den.add_parser("eval", help="Fréchet distance of samples in the dataset's feature space")
    sampling_args(e, 1000)
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(fn=cmd_denoiser_eval)

    l = sub.add_parser("layers", help="list the quantizable layers (the action order)")
    l.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
    l.add_argument("--json", action="store_true", help="print JSON")
    l.set_defaults(fn=cmd_layers)

    from .engine import DEFAULT_PRESET, QUANT_PRESETS

    def engine_args(q, n_default):
        q.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
        q.add_argument("--w", type=int, default=None, help="weight bits for every layer and step")
        q.add_argument("--a", type=int, default=None, help="activation bits for every layer and step")
        q.add_argument("--schedule", default=None,
                       help="JSON schedule file (full BitSchedule or bits_w/bits_a T x L) instead of --w/--a")
        q.add_argument("--n", type=_int_at_least(1), default=n_default, help=f"images (default: {n_default})")
        q.add_argument("--steps", type=_int_at_least(1), default=10,
                       help="sampler steps (default: 10; ignored with --schedule)")
        q.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="sampler (default: ddim)")
        q.add_argument("--act-ranges", default=None, choices=("dynamic", "static"),
                       help="activation ranges (default: dynamic, or the schedule's)")
        q.add_argument("--preset", default=None, choices=tuple(QUANT_PRESETS),
                       help=f"quantizer preset (default: {DEFAULT_PRESET}, or the schedule's quantizer block; ptq: "
                            "shortcut splitting, bias correction, weight clipping search; plain: none of them; "
                            "ptq-smooth: ptq + SmoothQuant at weight bits >= 8; ptq-recon: ptq + AdaRound; "
                            "ptq-gptq: ptq + GPTQ; full: ptq + SmoothQuant + AdaRound)")
        q.add_argument("--bank", default="eval", choices=("eval", "train"), help="noise bank (default: eval)")
        q.add_argument("--json", action="store_true", help="print JSON")

    q = sub.add_parser("quantize", help="run the quantized sampler under uniform bits or a schedule file")
    engine_args(q, 256)
    q.add_argument("--no-fd", action="store_true", help="skip the feature-space Fréchet distance")
    q.set_defaults(fn=cmd_quantize)

    fi = sub.add_parser("fidelity", help="integer execution (int8 operands, int32 accumulation) vs the simulation, "
                                         "layer by layer and end to end")
    engine_args(fi, 4)
    fi.set_defaults(fn=cmd_fidelity)

    tr = sub.add_parser("train", help="launch (or resume) a precision-policy training run")
    tr.add_argument("--config", required=True, help="YAML run config (experiments/configs/*.yaml)")
    tr.add_argument("--set", action="append", help="override a field: key=value (dotted, e.g. env.lam=2)")
    tr.add_argument("--run-dir", default=None, help="run directory (default runs/<name>)")
    tr.add_argument("--seeds", default=None, help="train once per seed, e.g. 0,1,2, into RUN_DIR/seed<s>")
    run_args(tr)
    tr.set_defaults(fn=cmd_train)

    sw = sub.add_parser("sweep", help="a grid of run configs x seeds on Ray Tune (local, or a cluster with --address)")
    sw.add_argument("--config", required=True, help="YAML run config")
    sw.add_argument("--grid", action="append", help="key=v1,v2,... (dotted; repeat for a product), e.g. env.lam=1,2,4")
    sw.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2")
    sw.add_argument("--set", action="append", help="override a field of every trial: key=value")
    sw.add_argument("--out", required=True, help="sweep folder (trials are run directories inside it)")
    sw.add_argument("--address", default=None, help="Ray cluster address (default: a private local Ray)")
    sw.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    sw.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (fractions share a card)")
    sw.add_argument("--no-evaluate", action="store_true", help="train only")
    sw.add_argument("--baselines", default="fast", choices=("all", "fast", "none"), help="evaluation baselines")
    sw.add_argument("--n", type=int, default=None, help="eval images (default from the run config)")
    sw.add_argument("--no-fd", action="store_true", help="skip Fréchet distances in the evaluation")
    sw.add_argument("--json", action="store_true", help="print JSON")
    sw.set_defaults(fn=cmd_sweep)

    rp = sub.add_parser("report", help="Markdown report + Pareto front with CI bars over evaluated runs and seeds")
    rp.add_argument("runs", nargs="+", help="run directories or folders of them")
    rp.add_argument("--out", required=True, help="report folder")
    rp.add_argument("--skip-unevaluated", action="store_true",
                    help="list runs without an evaluation instead of failing")
    rp.set_defaults(fn=cmd_report)

    ev = sub.add_parser("evaluate", help="evaluate a run's policy against the non-RL baselines")
    ev.add_argument("--run", required=True, help="run directory, or a folder of run directories (seeds, a sweep)")
    ev.add_argument("--baselines", default="all", choices=("all", "fast", "none"),
                    help="all | fast (no per-(layer, step) search) | none")
    ev.add_argument("--no-fd", action="store_true", help="skip the feature-space Fréchet distances")
    ev.add_argument("--budget", type=float, default=None,
                    help="baselines' BOPs budget, in (0, 1] (a fraction of FP32 BOPs; default: the learned cost)")
    ev.add_argument("--n", type=_int_at_least(1), default=None, help="eval-bank images (default from the run config)")
    ev.add_argument("--eval-seed", type=int, default=None,
                    help="noise seed of the eval images (default 2000, the eval bank; never 1000/3000: train/calib)")
    ev.add_argument("--permutations", type=_int_at_least(1), default=4,
                    help="derangements K in the permutation test")
    ev.add_argument("--search-budget", default="equal", choices=("equal", "free"),
                    help="equal: each search scores at most the schedules the learned run's training forwards pay "
                         "for; free: the searches' own defaults")
    ev.add_argument("--force", action="store_true", help="overwrite the run's existing evaluation (eval/)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(fn=cmd_evaluate)

    ex = sub.add_parser("export", help="export a run's bit schedule (its learned_mean_schedule.json)")
    ex.add_argument("--run", required=True, help="an evaluated run directory")
    ex.add_argument("--format", default="json", choices=FORMATS,
                    help=f"output format; single file: {', '.join(FILE_FORMATS)}; a folder of files: "
                         f"{', '.join(DIR_FORMATS)}")
    ex.add_argument("--out", required=True,
                    help=f"a FILE for {', '.join(FILE_FORMATS)} (an existing folder gets a default file name); "
                         f"a FOLDER for {', '.join(DIR_FORMATS)} (created; per-segment files + manifest.json)")
    ex.set_defaults(fn=cmd_export)

    dp = sub.add_parser("deploy", help="run a bit schedule in a real runtime").add_subparsers(dest="sub",
                                                                                             required=True)
    do = dp.add_parser("onnx", help="onnxruntime: one QDQ model per schedule segment, switched per sampler step; "
                                    "reports its error vs the FP sampler and vs qpolicy's simulation")
    do.add_argument("--schedule", default=None, help="a BitSchedule JSON (e.g. a run's learned_mean_schedule.json)")
    do.add_argument("--run", default=None, help="a run trained with env.action_space profiles: K profile variants, "
                                                "one picked per input group and step by the exported policy")
    do.add_argument("--model", default=None, help="shipped model or checkpoint folder (default: the schedule's)")
    do.add_argument("--n", type=int, default=16, help="images (the ONNX models' fixed batch size)")
    do.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    do.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    do.add_argument("--calib-n", type=int, default=32,
                    help="calibration images (calib noise bank) for the static activation ranges ORT and the "
                         "simulation share")
    do.add_argument("--out", default=None, help="folder for the models and manifest.json "
                                                "(default out/deploy_onnx/<schedule stem>)")
    do.add_argument("--json", action="store_true", help="print the result (errors, timings, segments, applied bits) "
                                                        "as JSON")
    do.set_defaults(fn=cmd_deploy_onnx)

    c = sub.add_parser("calibrate", help="store static activation ranges with a model (its checkpoint folder)")
    c.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
    c.add_argument("--steps", type=_int_at_least(1), default=10, help="sampler steps")
    c.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="sampler")
    c.add_argument("--buckets", type=_int_at_least(1), default=4, help="step buckets (ranges per layer and bucket)")
    c.add_argument("--n", type=_int_at_least(1), default=32, help="calibration images (the calib noise bank)")
    c.set_defaults(fn=cmd_calibrate)

    la = sub.add_parser("latency", help="measure a per-(layer, b_w, b_a) latency table on this device (env.cost "
                                        "latency); stored with the model unless --out")
    la.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
    la.add_argument("--batch", type=_int_at_least(1), default=64, help="images per timed call")
    la.add_argument("--repeats", type=_int_at_least(1), default=7, help="timed calls per layer and kernel (median)")
    la.add_argument("--bit-choices", default=None, help="comma-separated choice set (default 2,3,4,5,6,8,16,32)")
    la.add_argument("--out", default=None, help="table JSON (default <checkpoint>/latency/<device>.json)")
    la.add_argument("--json", action="store_true", help="print the table summary and the BOPs comparison as JSON")
    la.set_defaults(fn=cmd_latency)

    pr = sub.add_parser("profiles", help="find K precision profiles (per-layer bits; sensitivity ILP at budgets "
                                         "around the target) for env.action_space 'profiles'; write the JSON file")
    pr.add_argument("--config", default=None, help="YAML run config whose env fields to use (else the defaults)")
    pr.add_argument("--set", action="append", help="override an env field: key=value (e.g. env.num_steps=5)")
    pr.add_argument("--model", default=None, help="shipped model name or checkpoint folder (env.model)")
    pr.add_argument("--budget", type=float, default=None, help="target cost_rel_fp32 the budgets spread around "
                                                               "(env.budget; 0.0625 = uniform W8A8)")
    pr.add_argument("--num-profiles", type=_int_at_least(1), default=None, help="K (env.num_profiles, default 4)")
    pr.add_argument("--spread", type=float, default=None, help="ratio between neighbouring budgets "
                                                               "(env.profile_spread, default 2)")
    pr.add_argument("--out", required=True, help="profiles JSON file to write (atomically)")
    pr.add_argument("--json", action="store_true", help="print the profiles summary as JSON")
    pr.set_defaults(fn=cmd_profiles)

    d = sub.add_parser("demo", help="the main job: train a policy on digits16, evaluate vs baselines, export")
    d.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "experiments" / "configs"
                                           / "digits16_ppo_jax.yaml"), help="YAML run config")
    d.add_argument("--set", action="append", help="override a field: key=value (dotted, e.g. env.lam=2)")
    run_args(d)
    d.add_argument("--out", default="out/demo", help="run directory of the demo")
    d.set_defaults(fn=cmd_demo)
    _show_defaults(p)
    return p


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr (exit 2) that names the flag; ``--help`` shows the rest."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows each flag's default where its help does not already (and the default is a value)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" not in h and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            h += " (default: %(default)s)"
        return h


def _show_defaults(p: argparse.ArgumentParser) -> None:
    p.formatter_class = _DefaultsFormatter
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sp in act.choices.values():
                _show_defaults(sp)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _cli_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or environment (bad value, file, YAML, permission, lock), not bugs."""
    import yaml

    from .rundir import LockedError

    return (OSError, ValueError, ImportError, yaml.YAMLError, LockedError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; an input or environment error is one line on stderr and exit status 2 (the full
    traceback with ``--debug``)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except _cli_errors() as e:
        if args.debug:
            raise
        print(f"qpolicy: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qpolicy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
