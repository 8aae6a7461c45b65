"""Training runs end to end on a tiny checkpoint: config validation, train, evaluate, export, read back."""
import json

import numpy as np
import pytest

from qpolicy.cli import main
from qpolicy.denoiser import save_checkpoint
from qpolicy.evaluation import evaluate_run
from qpolicy.runs import RunConfig, export_run, load_config, train
from qpolicy.schedule import BitSchedule


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_denoiser):
    d = tmp_path_factory.mktemp("ck") / "tiny"
    return save_checkpoint(d, module=tiny_denoiser.module, params=tiny_denoiser.params,
                           schedule=tiny_denoiser.schedule, dataset="digits", image_shape=(8, 8, 1), train={})


def test_config_errors_name_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("agent: ppo\nenv: {model: digits16}\n")
    with pytest.raises(ValueError, match="unknown env fields \\['bogus'\\]"):
        load_config(cfg, ["env.bogus=1"])
    with pytest.raises(ValueError, match="unknown agent_kwargs \\['bogus'\\]"):
        load_config(cfg, ["agent_kwargs.bogus=1"])
    with pytest.raises(ValueError, match="budget must be a number"):
        load_config(cfg, ["budget=abc"])
    with pytest.raises(ValueError, match="seed must be an integer"):
        load_config(cfg, ["seed=abc"])
    with pytest.raises(ValueError, match="needs layerwise: false"):
        load_config(cfg, ["agent=sac", "layerwise=true"])
    with pytest.raises(ValueError, match="unknown config fields"):
        load_config(cfg, ["totl_timesteps=5"])
    with pytest.raises(ValueError, match="must look like key=value"):
        load_config(cfg, ["lam"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_train_evaluate_export_round_trip(tmp_path, tiny_ckpt, capsys):
    cfg = RunConfig(name="t", agent="ppo_jax", env={"model": str(tiny_ckpt), "num_steps": 3, "images_per_env": 2,
                                                     "bank_size": 8, "bit_choices": [4, 8]},
                    total_timesteps=96, num_envs=4, agent_kwargs={"num_steps": 6, "num_minibatches": 2},
                    eval_bank_size=5, wandb="disabled")
    run = tmp_path / "run"
    summary = train(cfg, run, progress=False)
    assert summary["timesteps"] == 96 and (run / "policy").is_dir() and (run / "config.yaml").exists()
    assert load_config(run / "config.yaml") == cfg
    res = evaluate_run(run, baselines="none", progress=False, with_fd=False)
    assert res["eval_n"] == 4  # rounded down to a multiple of images_per_env, for every policy
    learned, mean = res["policies"][:2]
    assert learned["kind"] == mean["kind"] == "learned" and learned["n"] == mean["n"] == 4
    for k in ("bops_rel_fp32", "mean_bits_w", "mean_bits_a", "traj_error", "final_error"):
        assert np.isfinite(learned[k])
    for p in (learned, mean):  # paired statistics and compute on every row
        lo, hi = p["final_error_ci"]
        assert lo <= p["final_error"] <= hi and "search_forwards" in p
    assert learned["search_forwards"] == 96 * 2  # decisions x images_per_env: one forward per per-step decision
    assert mean["vs_learned"]["verdict"] in ("better", "worse", "no difference")
    ad = res["adaptivity"]
    for k in ("gain", "gain_ci", "p_value", "vs_mean_schedule", "oracle_headroom", "captured"):
        assert k in ad
    if ad["oracle_headroom"] is not None:  # the best static schedule once more, image by image: its noise floor
        nf = ad["oracle"]["noise_floor"]
        assert nf["copies"] == 2 and nf["distinct"] in (1, 2) and 0 <= nf["headroom_rel"] < 1
    assert res["comparisons"][0]["baseline"] == mean["name"] and res["eval_seed"] == 2000
    assert (run / "eval" / "bits_vs_input.png").exists() and (run / "train_summary.json").exists()
    sched = BitSchedule.load(run / "eval" / "learned_mean_schedule.json")
    assert sched.bits_w.shape == (3, len(sched.layer_names)) and set(np.unique(sched.bits_w)) <= {4, 8}
    paths = export_run(run, "json", tmp_path / "out" / "s.json") + export_run(run, "csv", tmp_path / "out" / "s.csv")
    assert (tmp_path / "out" / "s_policy").is_dir()
    assert BitSchedule.load(paths[0]) == sched
    assert len((tmp_path / "out" / "s.csv").read_text().strip().splitlines()) == 1 + sched.T * sched.L
    # the exported schedule is read back by `qpolicy quantize --schedule` and scores as the mean schedule did
    assert main(["quantize", "--model", str(tiny_ckpt), "--schedule", str(paths[0]), "--n", "4", "--no-fd",
                 "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["bops_rel_fp32"] == pytest.approx(mean["bops_rel_fp32"])
    with pytest.raises(ValueError, match="train bank's noise stream"):
        evaluate_run(run, baselines="none", progress=False, with_fd=False, eval_seed=1000)
    other = evaluate_run(run, baselines="none", progress=False, with_fd=False, eval_seed=7000)
    assert other["eval_seed"] == 7000 and other["policies"][0]["final_error"] != learned["final_error"]
    with pytest.raises(ValueError, match="baselines must be one of"):
        evaluate_run(run, baselines="nonee")
    with pytest.raises(ValueError, match="must be an integer >= images_per_env"):
        evaluate_run(run, n=1, baselines="none")
