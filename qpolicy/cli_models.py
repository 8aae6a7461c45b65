"""``qpolicy`` commands about models and quantizers: denoiser train/sample/eval, layers, quantize, fidelity,
calibrate, latency, profiles (each ``cmd_*(args) -> exit status``; the parser is in :mod:`qpolicy.cli`)."""
from __future__ import annotations

import os

from .config import check_memory, config_kwargs


def _check_n(den, n: int, steps: int, *, flag: str = "--n") -> int:
    """--n against memory before any work: per image, the FP and quantized trajectories of steps + 1 states."""
    import numpy as np

    return check_memory(flag, n, int(np.prod(den.image_shape)) * 4 * 2 * (steps + 1))


def print_json(obj) -> None:
    """Print ``obj`` as standard JSON (NaN -> null), indented."""
    from .io import dumps

    print(dumps(obj, indent=2))


# ----------------------------------------------------------------------------- denoiser
def cmd_denoiser_train(a) -> int:
    from .train import TrainConfig, train_denoiser

    cfg = TrainConfig(**{"wandb": os.environ.get("WANDB_MODE", "offline"), **config_kwargs(a, TrainConfig)})
    summary = train_denoiser(cfg)
    print_json(summary)
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
    print_json(res) if a.json else print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
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
        print_json([{"path": l.path, "kind": l.kind, "params": l.params, "macs": l.macs,
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
           **({"keep_ends": a.keep_ends} if getattr(a, "keep_ends", None) is not None else {}), **res}
    if a.json:
        print_json(res)
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
        if a.keep_ends is not None:
            check_bits(a.keep_ends, qcfg.bit_choices, field="--keep-ends")
    den = load_denoiser(a.model)
    if a.schedule:
        from .diffusion import make_sampler
        from .engine import quant_config_from_block
        from .schedule import load_schedule_for, read_bits_file

        if a.w is not None or a.a is not None:
            raise ValueError("give either --w/--a (uniform bits) or --schedule FILE, not both")
        if a.keep_ends is not None:
            raise ValueError("--keep-ends applies to uniform bits (--w/--a), not to --schedule FILE (its bits are "
                             "used as given)")
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
    return den, eng, uniform_bits(eng, a.w, a.a, keep_ends=a.keep_ends)


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
        print_json(res)
        return 0
    for r in sorted(res["layers"], key=lambda r: -r["max_lsb"])[:10]:
        print(f"{r['path']:<32} {r['kind']:<6} max {r['max_lsb']:.3g} LSB ({r['max_abs']:.3g} abs)")
    print(f"{res['layers_int']}/{res['layers_total']} layers on the integer path; worst {res['worst_layer']}: "
          f"{res['max_lsb']:.3g} LSB; final error int vs simulation {res['final_error_int_vs_sim']:.3g} "
          f"(simulation vs FP {res['final_error_sim_vs_fp']:.3g})")
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

    print_json(profiles_cli(a)) if a.json else print("\n".join(profiles_cli(a, lines=True)))
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
        print_json({"path": str(out), **{k: rec[k] for k in ("model", "device", "batch", "bit_choices",
                                                              "fallback_layers", "comparison")}})
    else:
        c = rec["comparison"]
        print(f"latency table of {den.name} on {rec['device']['kind']} (batch {rec['batch']}): {out}")
        print(f"Spearman BOPs vs latency: entries {c['spearman_entries']:.3f}, within layers "
              f"{c['spearman_within_layer_mean']:.3f}")
        for k, v in c["uniform"].items():
            print(f"  uniform {k}: BOPs/FP32 {v['bops_rel_fp32']:.4f}, latency/FP32 {v['latency_rel_fp32']:.4f}")
    return 0
