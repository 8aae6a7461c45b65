"""Reports over many evaluated runs: runs that differ only in their seed form a group; each group gets the mean
over seeds of every policy's final error with its interval (:func:`qpolicy.stats.across_seeds`), the learned
policy seed by seed, and the paired learned-vs-baseline verdicts that ``qpolicy evaluate`` wrote.

:func:`build_report` writes ``report.md`` (a Markdown table per group), ``pareto.png`` (means with interval bars,
the learned policy of every group against every baseline, :func:`qpolicy.plots.pareto_ci`) and ``report.json``
(the returned dict). It reads only ``config.yaml`` and ``eval/evaluation.json`` of each run directory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .io import atomic_write_json, atomic_write_text, read_json
from .runs import read_config_mapping
from .stats import across_seeds

#: Config fields that do not change what a run learns: runs differing only in these are seeds of one group
#: (config.yaml's fingerprint hashes the seed, so it differs between seeds of one group).
NON_GROUPING_FIELDS = ("seed", "name", "wandb", "fingerprint")


# ------------------------------------------------------------------------------------------ reading runs
def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories from ``paths``: a directory with ``config.yaml`` is a run; one without (a sweep's out_dir, a
    runs/ folder) stands for its immediate sub-directories that have one, or that hold a failed sweep trial's
    ``error.txt`` (a trial refused before training writes no config). Duplicates are dropped (first kept)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"run directory not found: {p}; accepted: a run directory (with config.yaml) "
                                    "or a folder of them (seeds, a sweep)")
        if (p / "config.yaml").exists():
            found = [p]
        else:
            found = sorted(d for d in p.iterdir()
                           if d.is_dir() and ((d / "config.yaml").exists() or (d / "error.txt").exists()))
            if not found:
                raise FileNotFoundError(f"{p} is not a run directory (no config.yaml) and holds none")
        for d in found:
            if d.resolve() not in {o.resolve() for o in out}:
                out.append(d)
    if not out:
        raise ValueError("build_report: no run directories given")
    return out


def load_run_result(run_dir: str | Path) -> dict:
    """``{"run_dir", "config" (config.yaml as a dict), "evaluation" (eval/evaluation.json)}`` of one run; a clear
    FileNotFoundError naming the run when either is missing."""
    run_dir = Path(run_dir)
    cfg_file, ev_file = run_dir / "config.yaml", run_dir / "eval" / "evaluation.json"
    if not cfg_file.exists():
        if (run_dir / "error.txt").exists():
            raise FileNotFoundError(f"{run_dir} is a failed trial (its traceback is in {run_dir / 'error.txt'}): "
                                    f"pass --skip-unevaluated to report the others")
        raise FileNotFoundError(f"{cfg_file} not found: {run_dir} is not a qpolicy run directory")
    if not ev_file.exists():
        raise FileNotFoundError(f"run {run_dir} has no evaluation ({ev_file} not found): run "
                                f"`qpolicy evaluate --run {run_dir}` first")
    cfg = read_config_mapping(cfg_file)
    ev = read_json(ev_file, what="evaluation")
    if not isinstance(ev, dict) or not ev.get("policies"):
        raise ValueError(f"{ev_file} has no 'policies': not a qpolicy evaluation (re-run `qpolicy evaluate --run "
                         f"{run_dir}`)")
    return {"run_dir": str(run_dir), "config": cfg, "evaluation": ev}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _group_key(run: dict) -> str:
    cfg = {k: v for k, v in run["config"].items() if k not in NON_GROUPING_FIELDS}
    ev = run["evaluation"]
    return json.dumps({"config": cfg, "eval_n": ev.get("eval_n"), "eval_seed": ev.get("eval_seed"),
                       "search_budget": (ev.get("search_budget") or {}).get("mode")}, sort_keys=True, default=str)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return "—" if v is None else str(v)


def _group_fields(groups: list[list[dict]]) -> tuple[list[dict], list[str]]:
    """Each group's flattened config (dotted keys, plus eval_n) and the keys whose values differ between groups."""
    flat = [{**_flatten({k: v for k, v in g[0]["config"].items() if k not in NON_GROUPING_FIELDS}),
             "eval_n": g[0]["evaluation"].get("eval_n")} for g in groups]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return flat, [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def _varying_sort_key(groups: list[list[dict]]):
    """Sort key of a group: its values of the varying fields (numbers numerically, before anything else)."""
    _, varying = _group_fields(groups)

    def key(g: list[dict]):
        f = _group_fields([g])[0][0]
        return tuple((0, f[k], "") if isinstance(f.get(k), (int, float)) and not isinstance(f.get(k), bool)
                     else (1, 0, json.dumps(f.get(k), sort_keys=True, default=str)) for k in varying)

    return key


def _labels(groups: list[list[dict]]) -> list[str]:
    """What tells the groups apart: the config fields (dotted) whose values differ between groups."""
    flat, varying = _group_fields(groups)
    if not varying:
        return [str(g[0]["config"].get("name", "runs")) for g in groups]
    return [", ".join(f"{k}={_short(f.get(k))}" for k in varying) for f in flat]


# ------------------------------------------------------------------------------------------ one group
def _learned_row(ev: dict) -> dict:
    """The input-dependent learned policy's row (evaluate_run puts it first)."""
    pols = ev["policies"]
    for p in pols:
        if p.get("kind") == "learned" and p.get("input_dependent", True) and "mean_schedule" not in p["name"]:
            return p
    return pols[0]


def _comparisons(ev: dict) -> list[dict]:
    """The evaluation's paired comparisons as a list of dicts with a "baseline" key (absent: [])."""
    comps = ev.get("comparisons")
    if not comps:
        return []
    if isinstance(comps, dict):  # tolerate {baseline: {...}}
        comps = [{"baseline": k, **v} for k, v in comps.items() if isinstance(v, dict)]
    return [c for c in comps if isinstance(c, dict) and c.get("baseline")]


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def _mean_or_none(xs) -> float | None:
    v = _finite(xs)
    return sum(v) / len(v) if v else None


def summarize_adaptivity(runs: list[dict], seeds: list, *, level: float = 0.95) -> dict | None:
    """The adaptivity audits of a group's runs (``evaluation["adaptivity"]``), seed by seed and over seeds: the
    permutation gain (permuted − matched final error; > 0 means the schedules carry information about their
    inputs), learned − own mean schedule, the oracle headroom (relative to the best static schedule), the share of
    it the policy captured, and the learnable headroom's verdict. None when no run has an audit."""
    per_seed = []
    for s, r in zip(seeds, runs):
        a = r["evaluation"].get("adaptivity")
        if not a:
            continue
        vm, orc, lrn = a.get("vs_mean_schedule") or {}, a.get("oracle") or {}, a.get("learnable") or {}
        lvs = lrn.get("vs_best_static") or {}
        per_seed.append({"seed": s, "gain": a.get("gain"), "gain_ci": a.get("gain_ci"), "p_value": a.get("p_value"),
                         "vs_mean_schedule": vm.get("mean_diff"), "vs_mean_schedule_ci": vm.get("ci"),
                         "vs_mean_schedule_verdict": vm.get("verdict"),
                         "headroom_rel": orc.get("headroom_rel"), "best_static": orc.get("best_static"),
                         "captured": a.get("captured"), "learnable_rel": lvs.get("rel_diff"),
                         "learnable_verdict": lvs.get("verdict")})
    if not per_seed:
        return None
    over = {k: across_seeds(v, level=level) for k in ("gain", "vs_mean_schedule", "headroom_rel", "captured")
            if (v := _finite(p[k] for p in per_seed))}
    return {"per_seed": per_seed, "over_seeds": over,
            "significant_gain_in": sum(1 for p in per_seed if p["gain_ci"] and p["gain_ci"][0] > 0)}


def summarize_group(runs: list[dict], label: str, *, level: float = 0.95) -> dict:
    """One group's summary: per-policy means over seeds (final error with its across-seeds interval, BOPs),
    the learned policy per seed, and the paired comparisons per baseline over seeds."""
    runs = sorted(runs, key=lambda r: (r["config"].get("seed", 0), r["run_dir"]))
    seeds = [r["config"].get("seed") for r in runs]
    names: list[str] = list(dict.fromkeys(p["name"] for r in runs for p in r["evaluation"]["policies"]))
    policies = []
    for name in names:
        rows = [next((p for p in r["evaluation"]["policies"] if p["name"] == name), None) for r in runs]
        present = [(s, p) for s, p in zip(seeds, rows) if p is not None]
        fe = _finite(p.get("final_error") for _, p in present)
        bops = _finite(p.get("bops_rel_fp32") for _, p in present)
        if not fe or not bops:
            continue
        policies.append({
            "name": name, "kind": present[0][1].get("kind", "baseline"), "n": len(fe), "seeds": [s for s, _ in present],
            "final_error": across_seeds(fe, level=level), "bops_rel_fp32": sum(bops) / len(bops),
            "bops_rel_fp32_ci": [min(bops), max(bops)],
            "traj_error": _mean_or_none(p.get("traj_error") for _, p in present),
            "search_forwards": _mean_or_none(p.get("search_forwards") for _, p in present),
            "search_seconds": _mean_or_none(p.get("search_seconds") for _, p in present),
        })
    learned = []
    for s, r in zip(seeds, runs):
        ev = r["evaluation"]
        row = _learned_row(ev)
        best = ev.get("best_baseline_at_matched_cost")
        learned.append({"seed": s, "run_dir": r["run_dir"], "name": row["name"],
                        "bops_rel_fp32": row.get("bops_rel_fp32"), "final_error": row.get("final_error"),
                        "final_error_ci": row.get("final_error_ci"), "traj_error": row.get("traj_error"),
                        "best_baseline": best, "learned_beats_best_baseline": ev.get("learned_beats_best_baseline")})
    comps: dict[str, dict] = {}
    for s, r in zip(seeds, runs):
        best_name = (r["evaluation"].get("best_baseline_at_matched_cost") or {}).get("name")
        for c in _comparisons(r["evaluation"]):
            e = comps.setdefault(c["baseline"], {"baseline": c["baseline"], "kind": c.get("kind"), "per_seed": [],
                                                 "best_at_matched_cost_in": 0})
            e["per_seed"].append({"seed": s, "verdict": c.get("verdict"), "mean_diff": c.get("mean_diff"),
                                  "ci": c.get("ci"), "rel_diff": c.get("rel_diff"),
                                  "at_matched_cost": c.get("at_matched_cost"), "text": c.get("text")})
            e["best_at_matched_cost_in"] += int(best_name == c["baseline"])
    for e in comps.values():
        verdicts = [p["verdict"] for p in e["per_seed"] if p["verdict"]]
        e["verdicts"] = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
        diffs = _finite(p["mean_diff"] for p in e["per_seed"])
        e["mean_diff_over_seeds"] = across_seeds(diffs, level=level) if diffs else None
    return {"label": label, "name": runs[0]["config"].get("name"), "config": {k: v for k, v in runs[0]["config"]
                                                                             .items() if k not in NON_GROUPING_FIELDS},
            "eval_n": runs[0]["evaluation"].get("eval_n"), "n": len(runs), "seeds": seeds,
            "runs": [r["run_dir"] for r in runs], "policies": policies, "learned": learned,
            "comparisons": list(comps.values()), "has_comparisons": bool(comps),
            "eval_seed": runs[0]["evaluation"].get("eval_seed"), "search_budget": runs[0]["evaluation"].get("search_budget"),
            "adaptivity": summarize_adaptivity(runs, seeds, level=level)}


# ------------------------------------------------------------------------------------------ rendering
def _num(v: Any, spec: str = ".4g") -> str:
    return "—" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, spec)


def _mean_ci(s: dict | None, spec: str = ".4g") -> str:
    if not s:
        return "—"
    if s["n"] < 2:
        return f"{_num(s['mean'], spec)} (1 seed: no interval)"
    return f"{_num(s['mean'], spec)} [{_num(s['ci'][0], spec)}, {_num(s['ci'][1], spec)}]"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    lvl = f"{report['level'] * 100:g} %"
    lines = ["# qpolicy report", "",
             f"{report['n_runs']} evaluated run(s) in {len(report['groups'])} group(s). A group is the runs whose "
             f"config.yaml differ only in {', '.join(NON_GROUPING_FIELDS)} (and that were evaluated on the same "
             f"number of images); its numbers are means over seeds with a {lvl} interval over seeds "
             f"(Student t, `qpolicy.stats.across_seeds`). Baselines are fitted per run at that run's budget, so "
             f"they too are averaged over the group's runs.", "",
             "![cost vs final error, mean over seeds with intervals](pareto.png)", ""]
    if report.get("skipped"):
        lines += ["Skipped (no eval/evaluation.json): " + ", ".join(f"`{s}`" for s in report["skipped"]), ""]
    for i, g in enumerate(report["groups"], 1):
        lines += [f"## Group {i}: {g['label']}", "",
                  f"config `{g['name']}`, agent {g['config'].get('agent', '—')}, {g['n']} seed(s): "
                  f"{', '.join(map(str, g['seeds']))}; eval images {g['eval_n']}"
                  + (f" (noise seed {g['eval_seed']})" if g.get("eval_seed") is not None else "")
                  + (f"; searches capped at {sb['max_evaluations']} train-bank schedules (equal compute: the "
                     f"learned run's {sb['learned_forwards']:,} training forwards)" if (sb := g.get("search_budget"))
                     and sb.get("mode") == "equal" else "") + ".", ""]
        if len(set(map(str, g["seeds"]))) < len(g["seeds"]):
            lines += ["_Note: a seed appears more than once in this group (copies of one run?)._", ""]
        lines += [f"| policy | kind | BOPs/FP32 | final error mean [{lvl} CI] over seeds | search forwards | "
                  "search s | n seeds |", "|---|---|---:|---|---:|---:|---:|"]
        for p in g["policies"]:
            name = f"**{p['name']}**" if p["kind"] == "learned" else p["name"]
            fw = p.get("search_forwards")
            lines.append(f"| {name} | {p['kind']} | {_num(p['bops_rel_fp32'], '.4f')} | {_mean_ci(p['final_error'])} "
                         f"| {'—' if fw is None else format(round(fw), ',')} | {_num(p.get('search_seconds'), '.3g')} "
                         f"| {p['n']} |")
        lines += ["", "Learned policy per seed:", "",
                  "| seed | BOPs/FP32 | final error [CI over images] | best baseline at ≤ its cost | its final error "
                  "| learned beats it |", "|---:|---:|---|---|---:|---|"]
        for l in g["learned"]:
            ci = l.get("final_error_ci")
            fe = _num(l["final_error"]) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "")
            b = l.get("best_baseline") or {}
            beats = l.get("learned_beats_best_baseline")
            lines.append(f"| {l['seed']} | {_num(l['bops_rel_fp32'], '.4f')} | {fe} | {b.get('name', '—')} | "
                         f"{_num(b.get('final_error'))} | {'—' if beats is None else ('yes' if beats else 'no')} |")
        lines.append("")
        if g["has_comparisons"]:
            lines += ["Learned vs each policy (paired over the eval images, learned − other final error; "
                      "negative is better for the learned policy):", "",
                      f"| other policy | verdicts over seeds | mean difference over seeds [{lvl} CI] | per seed |",
                      "|---|---|---|---|"]
            for c in g["comparisons"]:
                name = c["baseline"] + (f" (best at matched cost in {c['best_at_matched_cost_in']}/{g['n']})"
                                        if c["best_at_matched_cost_in"] else "")
                verdicts = ", ".join(f"{v} {k}/{len(c['per_seed'])}" for v, k in c["verdicts"].items()) or "—"
                per = "; ".join(f"s{p['seed']}: {p['verdict'] or '—'} {_num(p['mean_diff'], '.3g')}"
                                + (f" [{_num(p['ci'][0], '.3g')}, {_num(p['ci'][1], '.3g')}]" if p.get("ci") else "")
                                for p in c["per_seed"])
                lines.append(f"| {_md_cell(name)} | {verdicts} | {_mean_ci(c['mean_diff_over_seeds'], '.3g')} | "
                             f"{_md_cell(per)} |")
        else:
            lines.append("_No paired learned-vs-baseline comparisons (`comparisons`) in these evaluation.json files: "
                         "re-run `qpolicy evaluate` with a version that writes them._")
        lines += render_adaptivity(g.get("adaptivity"), lvl)
        lines += ["", "Runs: " + ", ".join(f"`{r}`" for r in g["runs"]), ""]
    return "\n".join(lines)


def render_adaptivity(a: dict | None, lvl: str) -> list[str]:
    """The adaptivity audit of a group as Markdown lines (none without an audit)."""
    if not a:
        return []
    over = a["over_seeds"]
    lines = ["", "Adaptivity audit (does the input-dependent policy use its input?): permutation gain = final error "
             "with other groups' schedules − with their own (> 0: the schedules fit their inputs); learned − its own "
             "static mean schedule; oracle headroom = per image the best of the static schedules at ≤ the learned "
             "cost vs the best single one (relative); captured = the learned gain over the best static / headroom; "
             "learnable = a ridge predictor on x_T features picking the schedule, vs the best static (relative).", "",
             "| seed | permutation gain [CI] | p | learned − mean schedule [CI] | oracle headroom | captured "
             "| learnable |", "|---:|---|---:|---|---:|---:|---|"]
    for p in a["per_seed"]:
        gci, vci = p.get("gain_ci"), p.get("vs_mean_schedule_ci")
        lines.append(f"| {p['seed']} | {_num(p['gain'], '.3g')}" + (f" [{_num(gci[0], '.3g')}, {_num(gci[1], '.3g')}]"
                     if gci else "") + f" | {_num(p['p_value'], '.3g')} | {p.get('vs_mean_schedule_verdict') or '—'} "
                     f"{_num(p['vs_mean_schedule'], '.3g')}" + (f" [{_num(vci[0], '.3g')}, {_num(vci[1], '.3g')}]"
                     if vci else "") + f" | {_num(p['headroom_rel'], '.1%')} | {_num(p['captured'], '.2g')} | "
                     f"{p.get('learnable_verdict') or '—'} {_num(p['learnable_rel'], '+.1%')} |")
    lines += ["", f"Over seeds ({lvl} CI): permutation gain {_mean_ci(over.get('gain'), '.3g')} (significant in "
              f"{a['significant_gain_in']}/{len(a['per_seed'])} seeds); learned − mean schedule "
              f"{_mean_ci(over.get('vs_mean_schedule'), '.3g')}; oracle headroom {_mean_ci(over.get('headroom_rel'), '.1%')}; "
              f"captured {_mean_ci(over.get('captured'), '.2g')}."]
    return lines


def pareto_rows(groups: list[dict]) -> list[dict]:
    """Rows for :func:`qpolicy.plots.pareto_ci`: every policy of every group at its means over seeds."""
    multi = len(groups) > 1
    rows = []
    for g in groups:
        for p in g["policies"]:
            fe = p["final_error"]
            rows.append({"label": p["name"], "kind": p["kind"], "group": g["label"] if multi else None,
                         "bops_rel_fp32": p["bops_rel_fp32"], "final_error": fe["mean"],
                         "final_error_ci": fe["ci"] if fe["n"] > 1 else None,
                         "bops_ci": p["bops_rel_fp32_ci"] if p["n"] > 1 else None, "n": p["n"]})
    return rows


# ------------------------------------------------------------------------------------------ entry point
def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, level: float = 0.95,
                 title: str | None = None, skip_unevaluated: bool = False) -> dict:
    """Group evaluated runs by config (all but seed, name, wandb; and the eval image count), summarise each group
    over its seeds, and write ``out_dir/report.md``, ``out_dir/pareto.png`` and ``out_dir/report.json``.

    run_dirs: run directories, or folders holding them (a sweep's out_dir). Every run needs ``config.yaml`` and
    ``eval/evaluation.json`` (FileNotFoundError naming the run otherwise: run ``qpolicy evaluate --run DIR`` first);
    skip_unevaluated=True lists such runs under "skipped" instead (a sweep with failed trials). Returns the report dict: ``{"format", "version", "level", "n_runs", "runs", "groups": [{"label", "name",
    "config", "eval_n", "n", "seeds", "runs", "policies": [{"name", "kind", "n", "seeds", "final_error"
    (across_seeds dict: mean, std, ci, method, n, values, level), "bops_rel_fp32" (mean), "bops_rel_fp32_ci"
    (min, max), "traj_error"}], "learned": [per seed], "comparisons": [per other policy: verdict counts, per seed,
    mean_diff_over_seeds], "has_comparisons"}], "skipped", "files"}``."""
    from . import plots

    runs, skipped = [], []
    for d in expand_runs(run_dirs):
        if skip_unevaluated and not (d / "eval" / "evaluation.json").exists():
            skipped.append(str(d))
            continue
        runs.append(load_run_result(d))
    if not runs:
        raise FileNotFoundError(f"no evaluated runs among {[str(d) for d in run_dirs]} (skipped, not evaluated: "
                                f"{skipped}): run `qpolicy evaluate --run DIR` first")
    by_key: dict[str, list[dict]] = {}
    for r in runs:
        by_key.setdefault(_group_key(r), []).append(r)
    grouped = sorted(by_key.values(), key=_varying_sort_key(list(by_key.values())))
    labels = _labels(grouped)
    groups = [summarize_group(g, lab, level=level) for g, lab in zip(grouped, labels)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"format": "qpolicy-report", "version": 1, "level": level, "n_runs": len(runs),
                              "runs": [r["run_dir"] for r in runs], "groups": groups, "skipped": skipped}
    files = {"report": str(out_dir / "report.md"), "pareto": str(out_dir / "pareto.png"),
             "json": str(out_dir / "report.json")}
    plots.pareto_ci(pareto_rows(groups), out_dir / "pareto.png",
                    title=title or f"cost vs final error: mean over seeds, {level * 100:g} % intervals")
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    report["files"] = files
    atomic_write_json(out_dir / "report.json", report)
    return report


__all__ = ["NON_GROUPING_FIELDS", "build_report", "expand_runs", "load_run_result", "pareto_rows",
           "render_adaptivity", "render_markdown", "summarize_adaptivity", "summarize_group"]
