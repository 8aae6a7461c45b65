"""Sweeps: many training runs from one config, each a normal run directory.

* :func:`parse_grid` - ``["env.lam=1,2,4", "agent_kwargs.lr=1e-3,3e-4"]`` -> the cartesian product as a list of
  ``{dotted key: value}`` points (values read as YAML scalars, ``1e-3`` included).
* :func:`run_sweep` - every (grid point x seed) as a Ray Tune trial (a function trainable over
  ``tune.grid_search``): ``qpolicy.runs.train`` into ``out_dir/<name>__<key=value>...__seed<s>``, then (by default)
  ``qpolicy.evaluation.evaluate_run``. A failing trial is recorded with its error and the others go on; the
  results are written to ``out_dir/sweep.json``. Ray is optional (``pip install "qpolicy[sweep]"``).
* :func:`seeds_runs` - the same config over several seeds, sequentially and without Ray (``out_dir/seed<s>``).

A trial's run directory is exactly what ``qpolicy train --config C --set k=v --set seed=s --run-dir D`` makes, so
``qpolicy evaluate``, ``qpolicy export`` and :func:`qpolicy.report.build_report` read it as any other run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import yaml

from .io import atomic_write_json
from .runs import parse_value

RAY_MISSING = ('qpolicy sweeps run on Ray Tune, which is not installed: pip install "qpolicy[sweep]" '
               '(or pip install "ray[tune]")')
_NAME_SAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")
_MAX_NAME = 200  # characters of a run-directory name (file systems allow 255 bytes)


# ------------------------------------------------------------------------------------------ grid parsing
def format_value(v: Any) -> str:
    """``v`` as override text that :func:`qpolicy.runs.load_config` (``yaml.safe_load``) reads back as ``v``."""
    text = yaml.safe_dump(v, default_flow_style=True, width=1 << 16).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    elif text.endswith("..."):
        text = text[:-3].strip()
    if yaml.safe_load(text) != v:  # pragma: no cover - safe_dump round-trips every YAML scalar
        raise ValueError(f"cannot write {v!r} as a --set value")
    return text


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes: ``[4,8],[2,4]`` -> ``["[4,8]", "[2,4]"]``."""
    parts, cur, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ']' or '}'")
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise ValueError("unclosed quote, '[' or '{'")
    parts.append("".join(cur))
    return parts


def parse_grid(entries: Sequence[str]) -> list[dict[str, Any]]:
    """The cartesian product of ``key=v1,v2,...`` entries, as ``[{key: value, ...}, ...]`` (first entry slowest).

    Keys are dotted RunConfig fields as in ``--set`` (``env.lam``, ``agent_kwargs.lr``, ``total_timesteps``); values
    are YAML scalars or flow collections (``env.bit_choices=[4,8],[2,4,8]``: commas inside brackets do not split).
    No entries gives one empty point. Seeds are not a grid key (they are run_sweep's ``seeds``).
    ValueError naming the entry for a missing ``=``, an empty key or value, an unparsable value, a repeated key."""
    if isinstance(entries, str):
        raise ValueError(f"grid must be a list of 'key=v1,v2' strings, got the string {entries!r}")
    axes: list[tuple[str, list[Any]]] = []
    seen: set[str] = set()
    for e in entries:
        if not isinstance(e, str) or "=" not in e:
            raise ValueError(f"grid entry {e!r} must look like key=v1,v2,... (e.g. env.lam=1,2,4)")
        key, text = (s.strip() for s in e.split("=", 1))
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ValueError(f"grid entry {e!r}: {key!r} is not a (dotted) config field name")
        if key == "seed":
            raise ValueError(f"grid entry {e!r}: seeds are given separately (run_sweep(..., seeds=[0, 1, 2]), "
                             f"--seeds 0,1,2), not as a grid key")
        if key in seen:
            raise ValueError(f"grid entry {e!r}: key {key!r} appears in more than one entry")
        seen.add(key)
        try:
            tokens = _split_top(text)
        except ValueError as err:
            raise ValueError(f"grid entry {e!r}: {err}") from None
        values = []
        for tok in tokens:
            if not tok.strip():
                raise ValueError(f"grid entry {e!r}: empty value (values are comma-separated: {key}=1,2,4)")
            try:
                values.append(parse_value(tok.strip()))
            except yaml.YAMLError as err:
                raise ValueError(f"grid entry {e!r}: value {tok.strip()!r} is not a YAML scalar ({err})") from None
        axes.append((key, values))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def point_overrides(point: dict[str, Any]) -> list[str]:
    """``{key: value}`` -> ``["key=value", ...]`` in --set syntax."""
    return [f"{k}={format_value(v)}" for k, v in point.items()]


def _name_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_name_value(x) for x in v)
    if isinstance(v, dict):
        return ",".join(f"{k}:{_name_value(x)}" for k, x in v.items())
    return format_value(v)


def trial_name(name: str, point: dict[str, Any], seed: int) -> str:
    """``<name>__<key=value>__...__seed<s>``, file-system safe; long names are cut and keep a hash of the whole."""
    parts = [name] + [f"{k}={_name_value(v)}" for k, v in point.items()] + [f"seed{seed}"]
    full = "__".join(_NAME_SAFE.sub("-", p) for p in parts)
    if len(full) <= _MAX_NAME:
        return full
    h = hashlib.sha1(full.encode()).hexdigest()[:10]
    return f"{full[:_MAX_NAME - 20]}__{h}__seed{seed}"


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"0,1,2"`` (or an int, or a list of ints) -> ``[0, 1, 2]``; ValueError naming a bad or repeated seed."""
    if isinstance(text, bool):
        raise ValueError(f"seeds must be non-negative integers, got {text!r}")
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, str):
        items = [t.strip() for t in text.split(",")]
    else:
        items = list(text)
    out: list[int] = []
    for t in items:
        s = int(str(t).strip()) if not isinstance(t, bool) and str(t).strip().isdigit() else None
        if s is None:
            raise ValueError(f"seeds must be non-negative integers like 0,1,2; got {t!r} in {text!r}")
        if s in out:
            raise ValueError(f"seed {s} is repeated in {text!r}")
        out.append(s)
    if not out:
        raise ValueError("seeds: give at least one seed (e.g. 0,1,2)")
    return out


# ------------------------------------------------------------------------------------------ trials
def _plan(config_path, grid: Sequence[str] | Sequence[dict], seeds, out_dir: Path,
          overrides: Sequence[str]) -> list[dict]:
    """Every (point, seed) trial with its resolved overrides and run directory, each config validated up front."""
    from .runs import load_config

    points = parse_grid(grid) if all(isinstance(g, str) for g in grid) else [dict(p) for p in grid]
    seeds = parse_seeds(seeds)
    trials, names = [], set()
    for point in points:
        if "seed" in point:
            raise ValueError("seeds are given separately, not as a grid key")
        for seed in seeds:
            ov = [*overrides, *point_overrides(point), f"seed={seed}"]
            try:
                cfg = load_config(config_path, ov)
            except ValueError as e:
                raise ValueError(f"grid point {point} seed {seed}: {e}") from None
            name = trial_name(cfg.name, point, seed)
            if name in names:  # two points that read the same once made file-system safe
                name = f"{name}__{len(trials)}"
            names.add(name)
            trials.append({"index": len(trials), "name": name, "run_dir": str(out_dir / name), "seed": seed,
                           "params": point, "overrides": ov})
    return trials


def _learned_summary(res: dict) -> dict:
    """The sweep-relevant part of an evaluation result: the learned policy's row (no per-step lists) and the
    comparison keys."""
    learned = {k: v for k, v in res["policies"][0].items() if not isinstance(v, (list, dict))}
    out = {"learned": learned, "eval_n": res.get("eval_n"), "budget": res.get("budget"),
           "file": (res.get("files") or {}).get("evaluation")}
    for k in ("best_baseline_at_matched_cost", "learned_beats_best_baseline", "comparisons"):
        if k in res:
            out[k] = res[k]
    return out


def run_trial(config_path: str, trial: dict, *, evaluate: bool = True, baselines: str = "fast",
              eval_n: int | None = None, with_fd: bool = True, progress: bool = False) -> dict:
    """Train (and evaluate) one trial into its run directory; never raises for a failing run: the result has
    status "error", the error text, and ``<run_dir>/error.txt`` holds the traceback."""
    from .runs import load_config, train

    run_dir = Path(trial["run_dir"])
    out = {k: trial[k] for k in ("name", "run_dir", "seed", "params", "overrides")}
    out.update(status="ok", error=None, train=None, evaluation=None)
    t0 = time.time()
    stage = "config"
    try:
        cfg = load_config(config_path, trial["overrides"])
        stage = "train"
        out["train"] = train(cfg, run_dir, progress=progress)
        if evaluate:
            from .evaluation import evaluate_run

            stage = "evaluate"
            res = evaluate_run(run_dir, baselines=baselines, n=eval_n, progress=False, with_fd=with_fd)
            out["evaluation"] = _learned_summary(res)
    except Exception as e:  # a failing trial is a result, not the end of the sweep
        out.update(status="error", error=f"{stage}: {type(e).__name__}: {e}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(traceback.format_exc())
    out["wall_s"] = time.time() - t0
    return json.loads(json.dumps(out, default=_jsonable))


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item") and callable(o.item):  # numpy / jax scalars
        return o.item()
    if hasattr(o, "tolist") and callable(o.tolist):
        return o.tolist()
    return str(o)


def _tune_trainable(config: dict) -> None:
    """Ray Tune function trainable: one qpolicy trial; reports its result once (flat numbers for Tune's tables,
    the full result as JSON text under "qpolicy_json": Tune's loggers skip strings but would warn on lists)."""
    from ray import tune

    job, trial = config["job"], config["trial"]
    if job.get("cwd") and os.path.isdir(job["cwd"]):
        os.chdir(job["cwd"])  # Tune starts trials in a scratch folder; relative paths mean what they did for us
    gpus = job.get("gpus_per_trial") or 0
    if gpus < 1 and not any(k.startswith("XLA_PYTHON_CLIENT_") for k in os.environ):
        # trials sharing a GPU (or seeing one they were not given) must not each pre-allocate 75 % of it
        if gpus > 0:
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 * gpus:.3f}"
        else:
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    res = run_trial(job["config_path"], trial, evaluate=job["evaluate"], baselines=job["baselines"],
                    eval_n=job["eval_n"], with_fd=job["with_fd"], progress=False)
    atomic_write_json(Path(trial["run_dir"]) / "trial.json", res)
    learned = (res.get("evaluation") or {}).get("learned") or {}
    flat = {"ok": int(res["status"] == "ok"), "wall_s": res["wall_s"]}
    flat.update({k: learned[k] for k in ("final_error", "traj_error", "bops_rel_fp32") if k in learned})
    tune.report({**flat, "qpolicy_json": json.dumps(res)})


def _ray_error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    lines = [l for l in str(cause).strip().splitlines() if l.strip()]
    return f"ray: {type(cause).__name__}: {lines[-1].strip() if lines else ''}"


def run_sweep(config_path: str | Path, grid: Sequence[str] | Sequence[dict], seeds: str | Sequence[int],
              out_dir: str | Path, *, overrides: Sequence[str] = (), address: str | None = None,
              num_cpus: int | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
              max_concurrent: int | None = None, evaluate: bool = True, baselines: str = "fast",
              eval_n: int | None = None, with_fd: bool = True, progress: bool = True) -> list[dict]:
    """Run every (grid point x seed) as a Ray Tune trial; returns one result per trial, in grid order.

    config_path: YAML run config. grid: ``["env.lam=1,2,4", ...]`` (see :func:`parse_grid`) or a list of points.
    seeds: ``[0, 1, 2]`` or ``"0,1,2"``. out_dir: trials go to ``out_dir/<name>__<key=value>...__seed<s>``, the
    results to ``out_dir/sweep.json``, Tune's own state to ``out_dir/_tune``. overrides: ``--set``-style
    ``key=value`` applied to every trial before the grid point.
    address: a Ray cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None starts a private local Ray
    instance of ``num_cpus`` CPUs (default: all) and shuts it down afterwards (an already initialised Ray session
    is used as it is). Run directories must be on storage every node sees.
    cpus_per_trial / gpus_per_trial: Ray resources per trial (concurrency = what fits, at most max_concurrent).
    On a GPU host give gpus_per_trial (1, or a fraction to share a card: JAX then gets that fraction of its memory);
    with 0, trials still see the GPUs but do not pre-allocate their memory.
    evaluate / baselines / eval_n / with_fd: ``evaluate_run(run_dir, baselines=..., n=eval_n, with_fd=...)`` after
    training. progress: Tune's status table and the trials' logs on the console.

    Every config is validated before anything starts (ValueError naming the grid point). A trial that fails while
    training or evaluating has ``status: "error"`` and ``error`` ("stage: Type: message"; the traceback is in
    ``<run_dir>/error.txt``); the other trials go on. Each result: name, run_dir, seed, params (the grid point),
    overrides, status, error, train (train()'s summary), evaluation (the learned policy's row, the best baseline at
    matched cost, comparisons when evaluate_run gives them, the evaluation.json path), wall_s."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    from .evaluation import BASELINE_SETS

    if baselines not in BASELINE_SETS:
        raise ValueError(f"baselines must be one of {BASELINE_SETS}, got {baselines!r}")
    config_path = str(Path(config_path).resolve())
    out_dir = Path(out_dir).resolve()
    trials = _plan(config_path, list(grid), seeds, out_dir, list(overrides))
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {"config_path": config_path, "evaluate": bool(evaluate), "baselines": baselines, "eval_n": eval_n,
           "with_fd": bool(with_fd), "cwd": os.getcwd(), "gpus_per_trial": gpus_per_trial}
    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    own = not ray.is_initialized()
    if own:
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": progress}
        if address is None:
            kw.update(address="local", num_cpus=num_cpus)
        else:
            kw["address"] = address
        ray.init(**kw)
    try:
        resources = {"cpu": cpus_per_trial, **({"gpu": gpus_per_trial} if gpus_per_trial else {})}
        tuner = tune.Tuner(
            tune.with_resources(_tune_trainable, resources),
            param_space={"job": job, "trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                        trial_name_creator=lambda t: t.config["trial"]["name"],
                                        trial_dirname_creator=lambda t: f"trial{t.config['trial']['index']:04d}"),
            run_config=tune.RunConfig(name="tune", storage_path=str(out_dir / "_tune"), verbose=1 if progress else 0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid_res = tuner.fit()
        by_index: dict[int, dict] = {}
        for r in grid_res:
            t = (r.config or {}).get("trial") or {}
            if "index" not in t:
                continue
            text = (r.metrics or {}).get("qpolicy_json")
            got = json.loads(text) if text else None
            if got is None:  # the trial's process died (or Tune failed it) before it could report
                got = {k: t[k] for k in ("name", "run_dir", "seed", "params", "overrides")}
                got.update(status="error", train=None, evaluation=None, wall_s=None,
                           error=_ray_error_text(r.error) if r.error else "ray: the trial reported no result")
            by_index[t["index"]] = got
    finally:
        if own:
            ray.shutdown()
    results = []
    for t in trials:
        results.append(by_index.get(t["index"]) or {
            **{k: t[k] for k in ("name", "run_dir", "seed", "params", "overrides")},
            "status": "error", "error": "ray: no result for this trial", "train": None, "evaluation": None,
            "wall_s": None})
    grid_text = [g if isinstance(g, str) else dict(g) for g in grid]
    summary = {"format": "qpolicy-sweep", "version": 1, "config": config_path, "grid": grid_text,
               "seeds": parse_seeds(seeds),
               "overrides": list(overrides), "out_dir": str(out_dir), "started": started, "wall_s": time.time() - t0,
               "ray": {"version": ray.__version__, "address": address or "local"},
               "evaluate": {"enabled": bool(evaluate), "baselines": baselines, "eval_n": eval_n, "with_fd": with_fd},
               "n_trials": len(results), "n_errors": sum(r["status"] != "ok" for r in results), "trials": results}
    atomic_write_json(out_dir / "sweep.json", summary)
    return results


# ------------------------------------------------------------------------------------------ seeds without Ray
def seeds_runs(config_path: str | Path | None, seeds: str | Sequence[int], out_dir: str | Path,
               overrides: Sequence[str] = (), *, replace: dict | None = None, progress: bool = True) -> list[dict]:
    """``qpolicy train --seeds 0,1,2``: the same config trained once per seed, one after the other, into
    ``out_dir/seed<s>``; no Ray. Returns train()'s summaries with ``seed`` added.

    overrides: ``--set`` strings; replace: RunConfig fields set after them (the CLI's generated flags, as
    ``cmd_train`` applies ``config_kwargs``); the seed is set last. Every seed's config is validated before the
    first run starts; an error while training propagates (earlier seeds' run directories are complete)."""
    from .runs import load_config, train

    seeds = parse_seeds(seeds)
    base = load_config(config_path, list(overrides))
    if replace:
        base = dataclasses.replace(base, **{k: v for k, v in replace.items() if k != "seed"})
    cfgs = [dataclasses.replace(base, seed=s) for s in seeds]
    out_dir = Path(out_dir)
    summaries = []
    for s, cfg in zip(seeds, cfgs):
        summaries.append({"seed": s, **train(cfg, out_dir / f"seed{s}", progress=progress)})
    return summaries


__all__ = ["RAY_MISSING", "format_value", "parse_grid", "parse_seeds", "parse_value", "point_overrides", "run_sweep",
           "run_trial", "seeds_runs", "trial_name"]
