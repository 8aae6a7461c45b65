"""Run directories as transactions: fingerprints, the directory lock, metrics truncated on resume (a JAX PPO run's
bit-exact resume: tests/test_ppo_jax.py and, killed with SIGKILL, tests/test_faults.py)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from qpolicy.denoiser import save_checkpoint
from qpolicy.rundir import LOCK_FILE, LockedError, locked
from qpolicy.runs import RunConfig, load_run, train
from qpolicy.tracking import read_metrics, truncate_metrics


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_denoiser):
    d = tmp_path_factory.mktemp("ck") / "tiny"
    return save_checkpoint(d, module=tiny_denoiser.module, params=tiny_denoiser.params,
                           schedule=tiny_denoiser.schedule, dataset="digits", image_shape=(8, 8, 1), train={})


def tiny_cfg(ckpt, **kw):
    return RunConfig(**{"name": "t", "agent": "ppo_jax", "env": {"model": str(ckpt), "num_steps": 3,
                                                                  "images_per_env": 2, "bank_size": 8,
                                                                  "bit_choices": [4, 8]},
                        "total_timesteps": 96, "num_envs": 4, "checkpoint_every": 24,
                        "agent_kwargs": {"num_steps": 6, "num_minibatches": 2}, "wandb": "disabled", **kw})


def snapshot(d):
    """{path: bytes} of the files under ``d`` (the empty lock file a command leaves aside)."""
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def fake_run(root, cfg, policy_fp):
    """A run directory with config.yaml and a JAX PPO policy record carrying ``policy_fp`` (no training)."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "fingerprint": cfg.fingerprint()}))
    (root / "policy").mkdir()
    (root / "policy" / "policy.json").write_text(json.dumps({"format": "qpolicy.ppo_jax", "version": 1,
                                                             "config": {}, "meta": {"fingerprint": policy_fp}}))
    return root


def test_policy_of_another_config_is_refused(tiny_ckpt, tmp_path):
    from qpolicy.cli import main

    old, new = tiny_cfg(tiny_ckpt), tiny_cfg(tiny_ckpt, env={**tiny_cfg(tiny_ckpt).env, "bit_choices": [4, 6, 8]})
    run = fake_run(tmp_path / "run", new, old.fingerprint())  # config edited after training
    with pytest.raises(ValueError, match="made under another config"):
        load_run(run)
    assert main(["export", "--run", str(run), "--format", "csv", "--out", str(tmp_path / "x.csv")]) == 2
    assert main(["evaluate", "--run", str(run), "--baselines", "none", "--no-fd"]) == 2
    assert not (tmp_path / "x.csv").exists() and not (run / "eval").exists()


def test_training_into_a_run_of_another_config_is_refused(tiny_ckpt, tmp_path):
    old = tiny_cfg(tiny_ckpt)
    run = fake_run(tmp_path / "run", old, old.fingerprint())
    before = snapshot(run)
    new = tiny_cfg(tiny_ckpt, env={**old.env, "bit_choices": [4, 6, 8]})
    with pytest.raises(ValueError, match=r"another config \(changed: env.bit_choices\)"):
        train(new, run, progress=False)
    assert snapshot(run) == before  # nothing written


def test_invalid_config_writes_nothing(tiny_ckpt, tmp_path):
    run = tmp_path / "new"
    with pytest.raises(ValueError, match="num_minibatches"):
        train(tiny_cfg(tiny_ckpt, agent_kwargs={"num_steps": 6, "num_minibatches": 5}), run, progress=False)
    with pytest.raises(ValueError, match="agent_kwargs.n_steps must be an integer >= 1"):
        train(tiny_cfg(tiny_ckpt, agent="ppo", agent_kwargs={"n_steps": 0}), run, progress=False)
    with pytest.raises(ValueError, match="agent_kwargs.learning_rate must be a finite number"):
        train(tiny_cfg(tiny_ckpt, agent="a2c", agent_kwargs={"learning_rate": "abc"}), run, progress=False)
    assert not run.exists()


HOLD = """
import sys, time
from qpolicy.rundir import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_second_writer_is_refused_and_dead_holders_lock_is_taken_over(tmp_path):
    d = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"in use by pid {p.pid} on "):
            with locked(d):
                pass
    finally:
        p.kill()  # kill -9: the kernel drops its flock, the lock file (naming the dead pid) stays
        p.wait()
    assert str(p.pid) in (d / LOCK_FILE).read_text()
    with locked(d):  # the stale lock is taken over
        assert json.loads((d / LOCK_FILE).read_text())["pid"] == os.getpid()
        with locked(d):  # re-entrant within a process (demo: train, then evaluate)
            pass


def test_lock_on_a_new_folder_leaves_nothing_when_nothing_was_written(tmp_path):
    d = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with locked(d):
            raise RuntimeError("failed before writing")
    assert not d.exists()


def test_truncate_metrics_keeps_rows_up_to_the_checkpoint(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (10, 20, 30, 40)) + '{"step": 4')
    assert truncate_metrics(f, 20) == 3
    assert [r["step"] for r in read_metrics(f)] == [10, 20]
    assert truncate_metrics(f, 20) == 0


@pytest.mark.slow
def test_make_vec_env_with_sb3_ppo_trains(tiny_ckpt):
    """The standard SB3 recipe (make_vec_env asks for render_mode='rgb_array') works with both env ids."""
    import gymnasium

    import qpolicy.envs  # noqa: F401 - registers the env ids
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    kw = {"model": str(tiny_ckpt), "num_steps": 2, "images_per_env": 1, "bank_size": 2, "bit_choices": [4, 8],
          "quant_preset": "plain"}
    venv = make_vec_env("qpolicy/QuantDiffusion-v0", n_envs=2, env_kwargs=kw)
    agent = PPO("MlpPolicy", venv, n_steps=4, batch_size=8, n_epochs=1, device="cpu", seed=0).learn(16)
    assert agent.num_timesteps == 16
    assert venv.envs[0].unwrapped.render_mode == "rgb_array"  # what make_vec_env asks for
    lw = gymnasium.make("qpolicy/QuantDiffusionLayerwise-v0", **kw)
    assert lw.unwrapped.core.config.num_steps == 2
