"""Sweeps (grid parsing, trials, Ray Tune) and reports over seeds (grouping, means with intervals, Markdown, plot)."""
import json
import os
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import require
from qpolicy import sweep
from qpolicy.report import build_report
from qpolicy.runs import load_config
from qpolicy.sweep import format_value, parse_grid, parse_seeds, run_trial, seeds_runs, trial_name

CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "digits16_ppo_jax.yaml"


# ------------------------------------------------------------------------------------------ grid
def test_parse_grid_is_the_cartesian_product_of_yaml_values():
    pts = parse_grid(["env.lam=1,2,4", "agent_kwargs.lr=1e-3,3e-4"])
    assert pts == [{"env.lam": a, "agent_kwargs.lr": b} for a in (1, 2, 4) for b in (1e-3, 3e-4)]
    assert all(isinstance(p["agent_kwargs.lr"], float) for p in pts)  # 1e-3 is a string to YAML 1.1, not here
    assert parse_grid(["env.bit_choices=[4,8],[2, 4,8]", "layerwise=true", "name='a,b',c"]) == [
        {"env.bit_choices": [4, 8], "layerwise": True, "name": "a,b"},
        {"env.bit_choices": [4, 8], "layerwise": True, "name": "c"},
        {"env.bit_choices": [2, 4, 8], "layerwise": True, "name": "a,b"},
        {"env.bit_choices": [2, 4, 8], "layerwise": True, "name": "c"}]
    assert parse_grid([]) == [{}]
    for v in (1e-10, 3e-4, 2, True, None, "x", "yes", "1e-3", [4, 8]):  # overrides read back as the value
        assert yaml.safe_load(format_value(v)) == v
    assert trial_name("d16", {"env.lam": 1, "agent_kwargs.lr": 1e-3, "env.model": "/a b/c"}, 2) == \
        "d16__env.lam=1__agent_kwargs.lr=0.001__env.model=-a-b-c__seed2"
    long = trial_name("d16", {"env.model": "x" * 400}, 0)
    assert len(long) <= 220 and long.endswith("__seed0")


@pytest.mark.parametrize("entries, match", [
    (["env.lam"], "grid entry 'env.lam' must look like key=v1,v2"),
    (["=1,2"], "grid entry '=1,2': '' is not a \\(dotted\\) config field name"),
    (["env.lam=1,,2"], "grid entry 'env.lam=1,,2': empty value"),
    (["env.lam="], "grid entry 'env.lam=': empty value"),
    (["env.bit_choices=[4,8"], "grid entry 'env.bit_choices=\\[4,8': unclosed"),
    (["env.lam=1]"], "unbalanced"),
    (["seed=0,1"], "grid entry 'seed=0,1': seeds are given separately"),
    (["env.lam=1", "env.lam=2"], "grid entry 'env.lam=2': key 'env.lam' appears in more than one entry"),
    ("env.lam=1,2", "must be a list of 'key=v1,v2' strings"),
])
def test_parse_grid_errors_name_the_entry(entries, match):
    with pytest.raises(ValueError, match=match):
        parse_grid(entries)


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(3) == [3] and parse_seeds([2, 0]) == [2, 0]
    for bad, match in (("0,x", "got 'x'"), ("-1", "got '-1'"), ("0,0", "seed 0 is repeated"), ("", "got ''")):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)


def test_plan_validates_every_trial_up_front(tmp_path):
    trials = sweep._plan(str(CONFIG), ["env.lam=1,4", "agent_kwargs.lr=1e-3"], [0, 1], tmp_path, ["total_timesteps=64"])
    assert [t["name"] for t in trials] == [f"digits16_ppo_jax__env.lam={l}__agent_kwargs.lr=0.001__seed{s}"
                                           for l in (1, 4) for s in (0, 1)]
    cfg = load_config(CONFIG, trials[3]["overrides"])
    assert (cfg.env["lam"], cfg.agent_kwargs["lr"], cfg.seed, cfg.total_timesteps) == (4, 1e-3, 1, 64)
    with pytest.raises(ValueError, match=r"grid point \{'env.bogus': 1\} seed 0: unknown env fields \['bogus'\]"):
        sweep._plan(str(CONFIG), ["env.bogus=1"], [0], tmp_path, [])


def test_run_trial_records_a_failure_instead_of_raising(tmp_path, monkeypatch):
    import qpolicy.runs

    def boom(cfg, run_dir, progress=True):
        raise RuntimeError("the env exploded")

    monkeypatch.setattr(qpolicy.runs, "train", boom)
    t = sweep._plan(str(CONFIG), [], [3], tmp_path, [])[0]
    res = run_trial(str(CONFIG), t)
    assert res["status"] == "error" and res["error"] == "train: RuntimeError: the env exploded"
    assert res["seed"] == 3 and "RuntimeError" in (Path(t["run_dir"]) / "error.txt").read_text()
    json.dumps(res)  # plain JSON


def test_seeds_runs_one_run_dir_per_seed(tmp_path, monkeypatch):
    import qpolicy.runs

    seen = []
    monkeypatch.setattr(qpolicy.runs, "train", lambda cfg, run_dir, progress=True: seen.append((cfg, run_dir)) or
                        {"run_dir": str(run_dir), "timesteps": cfg.total_timesteps})
    out = seeds_runs(CONFIG, "0,2", tmp_path, ["env.lam=2"], replace={"total_timesteps": 32, "seed": 9},
                     progress=False)
    assert [s["seed"] for s in out] == [0, 2] and [s["timesteps"] for s in out] == [32, 32]
    assert [Path(d).name for _, d in seen] == ["seed0", "seed2"]
    assert [(c.seed, c.env["lam"]) for c, _ in seen] == [(0, 2), (2, 2)]
    seen.clear()
    with pytest.raises(ValueError, match="unknown env fields"):  # validated before anything trains
        seeds_runs(CONFIG, [0, 1], tmp_path, ["env.bogus=1"])
    assert not seen


def test_run_sweep_without_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r'pip install "qpolicy\[sweep\]"'):
        sweep.run_sweep(CONFIG, ["env.lam=1"], [0], tmp_path)


# ------------------------------------------------------------------------------------------ report
def _policy(name, kind, bops, fe):
    return {"name": name, "kind": kind, "bops_rel_fp32": bops, "final_error": fe, "traj_error": fe / 2,
            "input_dependent": name == "learned_ppo_jax"}


def _fake_run(root, name, seed, fe_learned, fe_ilp, *, lam=3.0, comparisons=True, run_name="d16", gain=0.002,
              eval_seed=2000):
    d = root / name
    (d / "eval").mkdir(parents=True)
    cfg = {"name": run_name, "agent": "ppo_jax", "env": {"model": "digits16", "num_steps": 10, "lam": lam},
           "seed": seed, "total_timesteps": 16000, "wandb": "offline", "fingerprint": f"{name}{seed:016d}"}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    ev = {"run": str(d), "model": "digits16", "steps": 10, "eval_n": 128,
          "policies": [_policy("learned_ppo_jax", "learned", 0.020 + 0.001 * seed, fe_learned),
                       _policy("learned_ppo_jax_mean_schedule", "learned", 0.019, fe_learned * 1.1),
                       _policy("uniform_w8a8", "baseline", 0.0625, 0.005),
                       _policy("sensitivity_ilp", "baseline", 0.020, fe_ilp)],
          "best_baseline_at_matched_cost": {"name": "sensitivity_ilp", "final_error": fe_ilp,
                                            "bops_rel_fp32": 0.02},
          "learned_beats_best_baseline": fe_learned < fe_ilp, "eval_seed": eval_seed,
          "adaptivity": {"gain": gain, "gain_ci": [gain - 0.001, gain + 0.001], "p_value": 0.01 if gain > 0.001 else 0.5,
                         "vs_mean_schedule": {"mean_diff": -0.1 * fe_learned, "ci": [-0.2, 0.0], "verdict": "better"},
                         "oracle": {"headroom_rel": 0.5, "best_static": "sensitivity_ilp"}, "captured": 0.2,
                         "learnable": {"vs_best_static": {"rel_diff": 0.1, "verdict": "worse"}}}}
    if comparisons:
        diff = fe_learned - fe_ilp
        ev["comparisons"] = [{"baseline": "sensitivity_ilp", "verdict": "better" if diff < 0 else "worse",
                              "mean_diff": diff, "ci": [diff - 0.001, diff + 0.001]}]
    (d / "eval" / "evaluation.json").write_text(json.dumps(ev))
    return d


def test_report_groups_seeds_and_averages(tmp_path):
    runs = tmp_path / "runs"
    a = _fake_run(runs, "a", 0, 0.010, 0.012)
    b = _fake_run(runs, "b", 1, 0.014, 0.011, run_name="other_name")  # names and wandb do not split a group
    rep = build_report([a, b], tmp_path / "rep")
    assert len(rep["groups"]) == 1
    g = rep["groups"][0]
    assert g["n"] == 2 and g["seeds"] == [0, 1]
    pol = {p["name"]: p for p in g["policies"]}
    learned = pol["learned_ppo_jax"]
    assert learned["n"] == 2 and learned["final_error"]["mean"] == pytest.approx(0.012)
    lo, hi = learned["final_error"]["ci"]
    half = 12.7062047 * np.std([0.010, 0.014], ddof=1) / math.sqrt(2)  # Student t, 1 degree of freedom
    assert (lo, hi) == (pytest.approx(0.012 - half), pytest.approx(0.012 + half))
    assert learned["bops_rel_fp32"] == pytest.approx(0.0205)
    assert pol["sensitivity_ilp"]["final_error"]["mean"] == pytest.approx(0.0115)
    assert [l["seed"] for l in g["learned"]] == [0, 1] and [l["learned_beats_best_baseline"] for l in g["learned"]] \
        == [True, False]
    (comp,) = g["comparisons"]
    assert comp["verdicts"] == {"better": 1, "worse": 1} and comp["best_at_matched_cost_in"] == 2
    assert comp["mean_diff_over_seeds"]["mean"] == pytest.approx(0.0005)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| **learned_ppo_jax** | learned | 0.0205 | 0.012 [" in md and "| 2 |" in md
    assert "better 1/2, worse 1/2" in md
    ad = g["adaptivity"]  # the adaptivity audits, seed by seed and over seeds
    assert [p["seed"] for p in ad["per_seed"]] == [0, 1] and ad["significant_gain_in"] == 2
    assert ad["over_seeds"]["gain"]["mean"] == pytest.approx(0.002)
    assert ad["over_seeds"]["vs_mean_schedule"]["mean"] == pytest.approx(-0.0012)
    assert "Adaptivity audit" in md and "significant in 2/2 seeds" in md and "| 0 | 0.002 [0.001, 0.003] | 0.01 |" in md
    png = (tmp_path / "rep" / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "rep" / "report.json").read_text()) == json.loads(json.dumps(rep))
    # a folder of runs stands for the runs in it; another lam is another group, labelled by what differs
    _fake_run(runs, "c", 0, 0.02, 0.03, lam=1.0, comparisons=False)
    _fake_run(runs, "d", 2, 0.02, 0.03, eval_seed=5000)  # another noise stream: not a seed of group lam=3
    rep = build_report([runs], tmp_path / "rep2")
    assert sorted(g["n"] for g in rep["groups"]) == [1, 1, 2]
    assert {g["eval_seed"] for g in rep["groups"]} == {2000, 5000}
    os.remove(runs / "d" / "config.yaml")
    rep = build_report([runs], tmp_path / "rep2")
    assert [(g["label"], g["n"]) for g in rep["groups"]] == [("env.lam=1", 1), ("env.lam=3", 2)]
    md = (tmp_path / "rep2" / "report.md").read_text()
    assert "## Group 1: env.lam=1" in md and "(1 seed: no interval)" in md and "No paired learned-vs-baseline" in md


def test_report_names_a_run_without_evaluation(tmp_path):
    ok = _fake_run(tmp_path, "ok", 0, 0.01, 0.02)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text("name: d16\nagent: ppo_jax\nseed: 1\n")
    with pytest.raises(FileNotFoundError, match=r"run .*bare has no evaluation .*: run `qpolicy evaluate --run "
                                                r".*bare` first"):
        build_report([ok, bare], tmp_path / "rep")
    rep = build_report([ok, bare], tmp_path / "rep", skip_unevaluated=True)
    assert rep["skipped"] == [str(bare)] and rep["n_runs"] == 1
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        build_report([tmp_path / "rep"], tmp_path / "rep3")


# ------------------------------------------------------------------------------------------ Ray Tune, for real
TINY = ["env.num_steps=2", "env.bank_size=4", "env.images_per_env=2", "num_envs=2", "total_timesteps=16",
        "agent_kwargs.num_steps=4", "agent_kwargs.num_minibatches=2", "agent_kwargs.update_epochs=1",
        "eval_bank_size=4", "wandb=disabled"]


@pytest.mark.slow
def test_ray_sweep_trains_evaluates_and_survives_a_failing_trial(tmp_path):
    require("ray")
    out = tmp_path / "sweep"
    # 2 real trials (lam 1 and 4, two PPO updates each on digits16 with 2 sampler steps) + 2 that fail in train()
    # (num_minibatches 3 does not divide the 8-decision rollout batch)
    res = sweep.run_sweep(CONFIG, ["env.lam=1,4", "agent_kwargs.num_minibatches=2,3"], [0], out, overrides=TINY,
                          num_cpus=2, baselines="none", eval_n=4, with_fd=False, progress=False)
    assert [(r["params"]["env.lam"], r["params"]["agent_kwargs.num_minibatches"], r["status"]) for r in res] == [
        (1, 2, "ok"), (1, 3, "error"), (4, 2, "ok"), (4, 3, "error")]
    for r in res:
        d = Path(r["run_dir"])
        assert d.parent == out and d.name == f"digits16_ppo_jax__env.lam={r['params']['env.lam']}__agent_kwargs." \
                                             f"num_minibatches={r['params']['agent_kwargs.num_minibatches']}__seed0"
        if r["status"] == "ok":
            assert load_config(d / "config.yaml").env["lam"] == r["params"]["env.lam"]
            assert (d / "policy").is_dir() and (d / "eval" / "evaluation.json").exists()
            assert r["train"]["timesteps"] == 16 and np.isfinite(r["evaluation"]["learned"]["final_error"])
        else:
            assert r["error"].startswith("train: ValueError: num_minibatches (3) must divide")
            assert (d / "error.txt").exists()
            assert not (d / "config.yaml").exists()  # a config refused before training writes no run files
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["n_trials"] == 4 and saved["n_errors"] == 2 and saved["trials"] == res
    rep = build_report([out], tmp_path / "report", skip_unevaluated=True)
    assert [(g["label"], g["n"]) for g in rep["groups"]] == [("env.lam=1", 1), ("env.lam=4", 1)]
    assert len(rep["skipped"]) == 2 and (tmp_path / "report" / "pareto.png").exists()
