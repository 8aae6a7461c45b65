"""Evaluation of a trained run against the non-RL baselines, on held-out noise, in named stages.

:func:`evaluate_run` = :func:`setup` -> :func:`score_learned` (the input-dependent policy, group by group) ->
:func:`score_mean_schedule` (its static fallback) -> :func:`score_baselines` (fit on the train bank, scored on
the eval bank at the learned policy's cost) -> :func:`add_fd` (feature-space Fréchet distances) ->
:func:`compare` (paired differences with 95 % bootstrap CIs and verdicts) -> :func:`audit` (the adaptivity audit,
:mod:`qpolicy.adaptivity`) -> :func:`write_outputs` (evaluation.json, schedules.npz, plots, the mean schedule).

Every policy runs on the same eval-bank images (in groups of images_per_env for the learned one;
per-image dynamic activation ranges make that grouping irrelevant to the errors), so every comparison is paired
over images. ``eval_seed`` draws those images from a noise stream no training, fitting or calibration used.
Compute: every row records ``search_forwards`` (denoiser image-forwards spent finding the policy: RL training
decisions for the learned one, scored schedules for searches) and ``search_seconds`` where known.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import adaptivity
from .banks import ReferenceBank, reference_bank
from .bits import geometric_mean_schedule
from .config import check, is_int
from .engine import QuantEngine, evaluate_schedule, grouped_errors
from .io import atomic_write_bytes, atomic_write_json, read_json
from .rundir import locked
from .runs import TRAIN_SUMMARY, RunConfig, load_run
from .stats import mean_ci, paired_difference, verdict_text

BASELINE_SETS = ("all", "fast", "none")  # fast: every baseline but the per-(layer, step) searches
#: "equal": every search may score as many schedules as the learned run's training forwards buy; "free": their own
#: defaults.
SEARCH_BUDGETS = ("equal", "free")
TRAIN_BANK_IMAGES = 32


@dataclasses.dataclass
class Record:
    """One evaluated policy: its JSON row, (S, L) bits (the mean schedule for the learned policy), samples and
    per-step, per-image errors (S, N) on the eval bank."""

    row: dict
    bits_w: np.ndarray
    bits_a: np.ndarray
    samples: np.ndarray | None
    errors: np.ndarray

    def __post_init__(self) -> None:
        self.row["final_error_ci"] = mean_ci(self.errors[-1])["ci"]
        self.row["traj_error_ci"] = mean_ci(self.errors.mean(0))["ci"]


@dataclasses.dataclass
class Setup:
    """What every stage needs: the run, its policy, the eval-bank env core and its params, the engine, the bank."""

    run_dir: Path
    cfg: RunConfig
    act: Callable
    core: Any
    params: Any
    engine: QuantEngine
    bank: ReferenceBank
    n: int
    eval_seed: int
    group_cost: np.ndarray | None = None  # the learned policy's BOPs/FP32 per image group (score_learned)


def setup(run_dir: str | Path, n: int | None = None, eval_seed: int | None = None) -> Setup:
    """Load the run and build the eval-bank core; ``n`` (default: the run's eval_bank_size) is rounded down to a
    multiple of images_per_env so every policy sees the same images. ``eval_seed``: the eval bank's noise stream
    (default: the eval bank's own, 2000)."""
    from qpolicy.banks import BANK_SEEDS

    from qpolicy.envs import EnvConfig, make_core

    run_dir = Path(run_dir)
    cfg, act = load_run(run_dir)
    B = EnvConfig(**cfg.env).images_per_env
    n = n or cfg.eval_bank_size
    if not is_int(n) or n < B:
        raise ValueError(f"n (eval-bank images, --n / eval_bank_size) must be an integer >= images_per_env={B}, "
                         f"got {n!r}")
    n = n // B * B
    core = make_core(layerwise=cfg.layerwise, **{**cfg.env, "bank": "eval", "bank_size": n})
    eng = core.engine
    bank = reference_bank(eng, "eval", n, seed=eval_seed)
    params = core.make_params(reference=bank)  # the eval bank, on eval_seed's stream when given
    return Setup(run_dir=run_dir, cfg=cfg, act=act, core=core, params=params, engine=eng, bank=bank, n=n,
                 eval_seed=BANK_SEEDS["eval"] if eval_seed is None else int(eval_seed))


def policy_schedules(cfg: RunConfig, act: Callable, core: Any, params: Any) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """Roll the deterministic policy over the bank in fixed groups of ``images_per_env`` images, with the env's
    batched step.

    Returns (idx (G, B) bank indices, bits_w (G, S, L), bits_a (G, S, L)): the input-dependent schedule
    the policy chose for each group."""
    from qpolicy.agents.sb3 import relaxed_to_index

    B, N = core.B, int(params.bank_keys.shape[0])
    G = N // B
    idx = jnp.arange(G * B, dtype=jnp.int32).reshape(G, B)
    obs, states = jax.jit(jax.vmap(core.reset_to, in_axes=(0, None)))(idx, params)
    S, L = core.engine.num_steps, core.L
    iw = np.zeros((G, S, L), np.int64)
    ia = np.zeros((G, S, L), np.int64)
    nvec = np.asarray(core.action_space(params).nvec)
    for d in range(core.episode_length):
        a = np.asarray(act(np.asarray(obs)))
        if cfg.agent == "sac":
            a = relaxed_to_index(a, nvec)
        a = a.reshape(G, -1)
        if cfg.layerwise:
            i, l = divmod(d, L)
            iw[:, i, l] = a[:, 0]
            ia[:, i, l] = a[:, -1]
        elif getattr(core, "profiles", None) is not None:  # action_space 'profiles': a profile index per step
            iw[:, d], ia[:, d] = core.action_indices(a)
        else:
            iw[:, d], ia[:, d] = a[:, :L], a[:, -L:]
        obs, states, *_ = core.jit_step_batch(jax.random.key(0), states, jnp.asarray(a), params)
    choices = np.asarray(core.engine.qcfg.bit_choices)
    return np.asarray(idx), choices[iw], choices[ia]


def learned_compute(s: Setup) -> dict[str, Any]:
    """What training the policy cost: denoiser image-forwards (each env decision that completes a sampler step
    runs one forward of images_per_env images; plus the probes of a warm start's ILP or of a profile search) and,
    when the run recorded it, wall seconds and device."""
    from qpolicy.envs import EnvConfig
    from qpolicy.profiles import PROFILES_FILE

    env = EnvConfig(**s.cfg.env)
    steps = s.cfg.total_timesteps // (s.core.L if s.cfg.layerwise else 1)
    out: dict[str, Any] = {"search_forwards": int(steps * env.images_per_env), "search_seconds": None}
    f = s.run_dir / TRAIN_SUMMARY
    if f.exists():
        summ = read_json(f, what="train summary")
        warm = summ.get("warm_start") or {}  # the search a warm start began from is part of the policy's cost
        out.update(search_seconds=summ.get("wall_s"), search_device=summ.get("device"),
                   search_forwards=int(summ.get("timesteps", s.cfg.total_timesteps)
                                       // (s.core.L if s.cfg.layerwise else 1) * env.images_per_env)
                   + int(warm.get("forwards", 0)))
    prof = s.run_dir / PROFILES_FILE  # so is the search that found a profile-mode run's profiles
    if prof.exists():
        search = read_json(prof, what="run profiles").get("search") or {}
        out["search_forwards"] += int(search.get("forwards") or 0)
        if out["search_seconds"] is not None and search.get("seconds"):
            out["search_seconds"] += float(search["seconds"])
    return out


def score_learned(s: Setup) -> tuple[Record, np.ndarray, np.ndarray, np.ndarray]:
    """The learned policy's input-dependent schedules scored group by group (bits are traced: no recompiles).

    Returns (record with the geometric-mean schedule as its bits, group bank indices idx (G, B), per-group
    bits_w (G, S, L), bits_a)."""
    eng, bank = s.engine, s.bank
    idx, bw_g, ba_g = policy_schedules(s.cfg, s.act, s.core, s.params)
    e, samples = grouped_errors(eng, bank, idx, bw_g, ba_g)
    cm = eng.cost_model()
    sums = [cm.summary(bw_g[g], ba_g[g]) for g in range(idx.shape[0])]
    row = {k: float(np.mean([x[k] for x in sums])) for k in sums[0]}
    # an input-dependent policy's cost varies by input (by design under a batch-mean budget): its spread
    group_cost = np.asarray([x["bops_rel_fp32"] for x in sums])
    row["bops_rel_fp32_spread"] = {"std": float(group_cost.std()), "min": float(group_cost.min()),
                                   "max": float(group_cost.max()), "groups": int(group_cost.size)}
    s.group_cost = group_cost
    row.update(name=f"learned_{s.cfg.agent}", kind="learned", traj_error=float(e.mean()),
               final_error=float(e[-1].mean()), per_step_error=e.mean(1).tolist(), n=int(e.shape[1]),
               input_dependent=True, **learned_compute(s))
    mean_w = geometric_mean_schedule(bw_g, eng.qcfg.bit_choices)
    mean_a = geometric_mean_schedule(ba_g, eng.qcfg.bit_choices)
    return Record(row, mean_w, mean_a, samples, e), idx, bw_g, ba_g


def _static_record(s: Setup, name: str, kind: str, bits_w: np.ndarray, bits_a: np.ndarray,
                   info: dict | None = None) -> Record:
    r = evaluate_schedule(s.engine, s.bank, bits_w, bits_a)
    samples, errors = r.pop("samples"), r.pop("errors")
    info = info or {}
    row = {**r, "name": name, "kind": kind, "search_forwards": info.get("forwards"),
           "search_seconds": info.get("seconds")}
    return Record(row, bits_w, bits_a, samples, errors)


def score_mean_schedule(s: Setup, learned: Record) -> Record:
    """The learned policy's static fallback: its geometric-mean schedule over the eval groups."""
    return _static_record(s, f"learned_{s.cfg.agent}_mean_schedule", "learned", learned.bits_w, learned.bits_a)


def score_baselines(s: Setup, budget: float, baselines: str, *, progress: bool,
                    max_evaluations: int | None = None) -> list[Record]:
    """Fit every baseline on the train bank at ``budget`` (searches capped at ``max_evaluations`` scored schedules)
    and score it on the eval bank."""
    if baselines == "none":
        return []
    from qpolicy.agents.baselines import all_baselines

    train_bank = reference_bank(s.engine, "train", TRAIN_BANK_IMAGES)
    bls = all_baselines(s.engine, train_bank, budget, search=baselines == "all", progress=progress,
                        max_evaluations=max_evaluations)
    return [_static_record(s, b.name, "baseline", b.bits_w, b.bits_a, b.info)
            for b in tqdm(bls, desc="evaluate baselines", disable=not progress)]


def add_fd(s: Setup, records: list[Record], *, progress: bool) -> dict[str, float | None]:
    """Feature-space Fréchet distance of every record's samples (in place, ``row["fd"]``); returns fd_fp and
    fd_real_split of the FP samples (None when the model records no dataset)."""
    dataset = s.engine.den.dataset
    if not dataset:
        return {"fd_fp": None, "fd_real_split": None}
    from qpolicy.features import load_feature_extractor
    from qpolicy.metrics import real_reference, sample_quality

    ext = load_feature_extractor(dataset)
    real, m = real_reference(dataset, s.n)
    rf = (ext.features(real[:m]), ext.features(real[m:]))
    for rec in tqdm(records, desc="fd", disable=not progress):
        rec.row["fd"] = sample_quality(rec.samples, dataset, extractor=ext, real_features=rf)["fd"]
    fp = sample_quality(np.asarray(s.bank.traj[-1]), dataset, extractor=ext, real_features=rf)
    return {"fd_fp": fp["fd"], "fd_real_split": fp["fd_real_split"]}


def compare(records: list[Record]) -> dict[str, Any]:
    """Paired comparisons of the learned policy with every other policy (final error per image, learned − other,
    95 % bootstrap CI, verdict in words), and the best baseline at or below the learned policy's cost.

    ``learned_beats_best_baseline`` is True only when the CI of the paired difference lies below 0."""
    learned = records[0]
    comps = []
    for r in records[1:]:
        d = paired_difference(learned.errors[-1], r.errors[-1])
        r.row["vs_learned"] = {k: d[k] for k in ("mean_diff", "ci", "rel_diff", "verdict")}
        # matched in the engine's cost (cost_rel_fp32: BOPs, or latency with env.cost 'latency')
        comps.append({"baseline": r.row["name"], "kind": r.row["kind"], "bops_rel_fp32": r.row["bops_rel_fp32"],
                      "cost_rel_fp32": r.row["cost_rel_fp32"],
                      "at_matched_cost": r.row["cost_rel_fp32"] <= learned.row["cost_rel_fp32"] + 1e-9,
                      **r.row["vs_learned"], "text": verdict_text(d, learned.row["name"], r.row["name"])})
    out: dict[str, Any] = {"comparisons": comps}
    matched = [c for c in comps if c["kind"] == "baseline" and c["at_matched_cost"]]
    if matched:
        best = min(matched, key=lambda c: next(r.row["final_error"] for r in records if r.row["name"] == c["baseline"]))
        row = next(r.row for r in records if r.row["name"] == best["baseline"])
        out["best_baseline_at_matched_cost"] = {"name": row["name"], "final_error": row["final_error"],
                                                "final_error_ci": row["final_error_ci"],
                                                "bops_rel_fp32": row["bops_rel_fp32"],
                                                "cost_rel_fp32": row["cost_rel_fp32"],
                                                "search_forwards": row.get("search_forwards"),
                                                "verdict": best["verdict"], "text": best["text"]}
        out["learned_beats_best_baseline"] = best["verdict"] == "better"
    return out


def recommend(result: dict[str, Any]) -> dict[str, Any]:
    """The policy the evidence supports at the learned policy's cost: the learned, input-dependent policy only when
    its paired CI says it is better than both the best baseline at ≤ its cost and its own static mean schedule;
    otherwise the static schedule with the lower mean final error of those two (input dependence that earns nothing
    is not worth a runtime that switches schedules)."""
    pol = {p["name"]: p for p in result["policies"]}
    learned, mean = result["policies"][0], result["policies"][1]
    best = result.get("best_baseline_at_matched_cost")
    vs_mean = (result.get("adaptivity") or {}).get("vs_mean_schedule", {}).get("verdict")
    beats_best = best is None or best["verdict"] == "better"
    if beats_best and vs_mean == "better":
        return {"policy": learned["name"], "static": False,
                "why": f"the learned policy is better (95 % CI) than its own mean schedule and than "
                       f"{best['name'] if best else 'every baseline'} at its cost: input dependence pays here"}
    static = [mean] + ([pol[best["name"]]] if best else [])
    pick = min(static, key=lambda p: p["final_error"])
    reasons = []
    if not beats_best:
        phrase = {"worse": "worse than", "no difference": "no better than"}[best["verdict"]]
        reasons.append(f"the learned policy is {phrase} {best['name']} at its cost (95 % CI)")
    if vs_mean != "better":
        reasons.append(f"its input dependence earns nothing against its own mean schedule ({vs_mean})")
    return {"policy": pick["name"], "static": True,
            "why": "; ".join(reasons) + f": the static {pick['name']} (final error {pick['final_error']:.4g}) is "
                   "the schedule to deploy"}


def audit(s: Setup, records: list[Record], idx: np.ndarray, bw_g: np.ndarray, ba_g: np.ndarray, *,
          k: int = 4) -> dict[str, Any]:
    """The adaptivity audit (:mod:`qpolicy.adaptivity`): learned vs its own mean schedule, the permutation test
    over groups, the oracle headroom over the static schedules at or below the learned cost, and the learnable
    headroom from x_T features a deployed sampler knows."""
    learned, mean = records[0], records[1]
    B = idx.shape[1]
    matched = learned.errors[-1].reshape(-1, B).mean(1)
    perm = adaptivity.permutation_audit(s.engine, s.bank, idx, bw_g, ba_g, matched, k=k)
    cost = learned.row["cost_rel_fp32"] + 1e-9
    menu = {r.row["name"]: r.errors[-1] for r in records[1:] if r.row["cost_rel_fp32"] <= cost}
    feats = adaptivity.input_features(s.bank.traj[0], s.core.config.thumb_size)
    oracle = adaptivity.oracle_headroom(menu, learned.errors[-1])
    best = oracle.get("best_static")
    if best in menu:  # its noise floor: the best static schedule once more, image by image (other float numerics)
        rec = next(r for r in records if r.row["name"] == best)
        n = len(rec.errors[-1])
        e1, _ = grouped_errors(s.engine, s.bank, np.arange(n).reshape(n, 1), rec.bits_w[None], rec.bits_a[None],
                               np.zeros(n, int))
        oracle["noise_floor"] = adaptivity.noise_floor(np.stack([rec.errors[-1], e1[-1]]))
    out = {"vs_mean_schedule": adaptivity.vs_mean_schedule(learned.errors[-1], mean.errors[-1]),
           "gain": perm.get("gain"), "gain_ci": perm.get("gain_ci"), "p_value": perm.get("p_value"),
           "permutation": perm, "oracle_headroom": oracle.get("headroom"), "oracle": oracle,
           "captured": oracle.get("captured"), "learnable": adaptivity.learnable_headroom(feats, menu)}
    if s.engine.den.conditioning is not None:
        static = {"mean_schedule": mean.errors[-1], **({"best_static": menu[best]} if best in menu else {})}
        out["by_request"] = adaptivity.by_request(s.engine.den.conditioning, s.bank.keys, learned.errors[-1],
                                                  np.repeat(s.group_cost, B), static)
    return out


def write_outputs(s: Setup, records: list[Record], result: dict) -> dict:
    """evaluation.json, schedules.npz (every policy's (S, L) bits), the Pareto plot, bit heatmaps, the FP-vs-learned
    sample grid and the learned mean schedule (a BitSchedule, the policy's static fallback) under run_dir/eval."""
    from qpolicy import plots
    from qpolicy.schedule import BitSchedule

    eng, out_dir = s.engine, s.run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "evaluation.json", result)
    buf = io.BytesIO()  # every schedule's bits, for re-plotting or re-use: name -> (S, L) arrays
    np.savez(buf, **{f"{r.row['name']}__{which}": b for r in records for which, b in (("w", r.bits_w),
                                                                                      ("a", r.bits_a))})
    atomic_write_bytes(out_dir / "schedules.npz", buf.getvalue())
    plots.pareto(result["policies"], out_dir / "pareto.png", title=f"{eng.den.name}: cost vs final error")
    plots.bit_heatmaps([(r.row["name"], r.bits_w, r.bits_a) for r in records], [l.path for l in eng.den.layers],
                       out_dir / "bits_heatmaps.png", choices=eng.qcfg.bit_choices)
    plots.fp_vs_quantized(np.asarray(s.bank.traj[-1][:32]), records[0].samples[:32],
                          out_dir / "samples_fp_vs_learned.png")
    mean = records[1]
    sched = BitSchedule.for_denoiser(eng.den, eng.sampler, mean.bits_w, mean.bits_a,
                                     quantizer=eng.qcfg.quantizer_block(),
                                     summary={k: v for k, v in mean.row.items() if isinstance(v, (int, float))},
                                     provenance={"policy": f"learned_{s.cfg.agent}", "kind": "mean schedule of an "
                                                 "input-dependent policy over the eval bank (static fallback)",
                                                 "run": str(s.run_dir), "seed": s.cfg.seed,
                                                 "config": s.cfg.to_dict()},
                                     bit_choices=eng.qcfg.bit_choices)
    sched.save(out_dir / "learned_mean_schedule.json")
    rec = next(r for r in records if r.row["name"] == result["recommendation"]["policy"])
    if result["recommendation"]["static"]:  # the schedule the evidence supports, ready to export
        BitSchedule.for_denoiser(eng.den, eng.sampler, rec.bits_w, rec.bits_a, quantizer=eng.qcfg.quantizer_block(),
                                 summary={k: v for k, v in rec.row.items() if isinstance(v, (int, float))},
                                 provenance={"policy": rec.row["name"], "kind": "recommended: "
                                             + result["recommendation"]["why"], "run": str(s.run_dir)},
                                 bit_choices=eng.qcfg.bit_choices).save(out_dir / "recommended_schedule.json")
    result["files"] = {"evaluation": str(out_dir / "evaluation.json"), "pareto": str(out_dir / "pareto.png"),
                       "heatmaps": str(out_dir / "bits_heatmaps.png"),
                       "samples": str(out_dir / "samples_fp_vs_learned.png"),
                       "bits_vs_input": str(out_dir / "bits_vs_input.png"),
                       "schedule": str(out_dir / "learned_mean_schedule.json"),
                       **({"recommended": str(out_dir / "recommended_schedule.json")}
                          if result["recommendation"]["static"] else {})}
    atomic_write_json(out_dir / "evaluation.json", result)
    return result


def evaluate_run(run_dir: str | Path, *, baselines: str = "all", budget: float | None = None,
                 n: int | None = None, eval_seed: int | None = None, progress: bool = True, with_fd: bool = True,
                 permutations: int = 4, search_budget: str = "equal", overwrite: bool = True) -> dict[str, Any]:
    """Evaluate the learned policy and the baselines on the held-out eval bank; write plots and schedules.

    baselines: "all" | "fast" (no per-(layer, step) search) | "none". budget: the baselines' bops_rel_fp32 budget
    (default: the run config's, else the learned policy's own cost). n: eval images. eval_seed: noise stream of the
    eval images (default: the eval bank's). permutations: K derangements in the permutation test.
    search_budget: "equal" (default: every search scores at most as many train-bank schedules as the learned run's
    training forwards pay for: learned forwards / (32 images x S steps)) or "free" (the searches' own defaults).
    overwrite: False refuses a run that already has an evaluation (``qpolicy evaluate`` without ``--force``).
    The run directory is locked while the evaluation runs."""
    if baselines not in BASELINE_SETS:
        raise ValueError(f"baselines must be one of {BASELINE_SETS}, got {baselines!r}")
    if search_budget not in SEARCH_BUDGETS:
        raise ValueError(f"search_budget must be one of {SEARCH_BUDGETS}, got {search_budget!r}")
    check("budget", budget, kind="real", lo=0, lo_open=True, hi=1, optional=True)
    check("permutations", permutations, kind="int", lo=1)
    check("n", n, kind="int", lo=1, optional=True)
    if eval_seed is not None:
        from .banks import check_eval_seed

        check_eval_seed(eval_seed)
    done = Path(run_dir) / "eval" / "evaluation.json"
    if not overwrite and done.exists():
        raise ValueError(f"{Path(run_dir)} already has an evaluation ({done}); pass --force to overwrite it")
    if not (Path(run_dir) / "config.yaml").exists():
        raise FileNotFoundError(f"{Path(run_dir) / 'config.yaml'} not found: --run must be a run directory "
                                "written by `qpolicy train`")
    with locked(run_dir):
        return _evaluate(run_dir, baselines=baselines, budget=budget, n=n, eval_seed=eval_seed, progress=progress,
                         with_fd=with_fd, permutations=permutations, search_budget=search_budget)


def _evaluate(run_dir, *, baselines, budget, n, eval_seed, progress, with_fd, permutations, search_budget):
    clock = _StageClock()
    with clock("setup"):
        s = setup(run_dir, n, eval_seed)
    with clock("learned"):
        learned, idx, bw_g, ba_g = score_learned(s)
        records = [learned, score_mean_schedule(s, learned)]
    budget = budget if budget is not None else (s.cfg.budget if s.cfg.budget is not None
                                                else learned.row["cost_rel_fp32"])
    cap = None
    if search_budget == "equal":
        cap = max(1, learned.row["search_forwards"] // (TRAIN_BANK_IMAGES * s.engine.num_steps))
    with clock("baselines"):
        records += score_baselines(s, budget, baselines, progress=progress, max_evaluations=cap)
    with clock("fd"):
        fd = add_fd(s, records, progress=progress) if with_fd else {"fd_fp": None, "fd_real_split": None}
    comparison = compare(records)
    with clock("adaptivity"):
        adapt = audit(s, records, idx, bw_g, ba_g, k=permutations)
    result = {"run": str(s.run_dir), "model": s.engine.den.name, "steps": s.engine.num_steps, "eval_n": s.n,
              "eval_seed": s.eval_seed, "budget": budget,
              "search_budget": {"mode": search_budget, "max_evaluations": cap,
                                "learned_forwards": learned.row["search_forwards"]}, **fd,
              "policies": [r.row for r in records], **comparison, "adaptivity": adapt}
    result["recommendation"] = recommend(result)
    with clock("plots"):
        plots_bits_vs_input(s, idx, bw_g)
    result["stage_seconds"] = clock.seconds
    result["device"] = str(jax.devices()[0].device_kind)
    return write_outputs(s, records, result)


class _StageClock:
    """Wall seconds per named stage of an evaluation (``stage_seconds`` in evaluation.json)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def plots_bits_vs_input(s: Setup, idx: np.ndarray, bw_g: np.ndarray) -> Path:
    """How the chosen bits move with observable input features: each group's mean weight bits vs its x_T
    features (plot under run_dir/eval)."""
    from qpolicy import plots

    feats = adaptivity.input_features(s.bank.traj[0], s.core.config.thumb_size)
    g_feats = feats[idx].mean(1)  # (G, D)
    return plots.bits_vs_features(np.log2(bw_g).mean((1, 2)), {"x_T std": g_feats[:, -2], "x_T |max|": g_feats[:, -1],
                                                              "x_T mean": g_feats[:, -3]},
                                  s.run_dir / "eval" / "bits_vs_input.png")
