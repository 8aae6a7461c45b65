"""Fault tests (slow): a training process killed with SIGKILL mid-run, then resumed, ends where an uninterrupted
run ends, with every metrics step logged once, in order; a second writer to a run directory is refused.

The killed process is slowed down (a sleep after each metrics row) so that the kill lands mid-run, after a
checkpoint, with rows past it in metrics.jsonl -- the state a real crash leaves."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qpolicy.cli import main
from qpolicy.denoiser import save_checkpoint
from qpolicy.tracking import read_metrics

pytestmark = pytest.mark.slow

SLOW_DRIVER = """
import json, sys, time
from qpolicy import tracking
log = tracking.Tracker.log
def slow(self, metrics, step):
    log(self, metrics, step)
    time.sleep(float(sys.argv[2]))
tracking.Tracker.log = slow
from qpolicy.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def start_slow(argv: list[str], delay: float, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, json.dumps(argv), str(delay)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(p: subprocess.Popen, ready, timeout: float = 600) -> None:
    """SIGKILL ``p`` as soon as ``ready()``; fails if it finished first."""
    t0 = time.time()
    while not ready():
        assert p.poll() is None, f"finished before the kill: {p.stderr.read()[-2000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL


def steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl")]


def rows_past(run: Path, step: int) -> bool:
    return any(s > step for s in steps(run))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_denoiser):
    d = tmp_path_factory.mktemp("ck") / "tiny"
    return save_checkpoint(d, module=tiny_denoiser.module, params=tiny_denoiser.params,
                           schedule=tiny_denoiser.schedule, dataset="digits", image_shape=(8, 8, 1), train={})


def run_config(tmp_path: Path, ckpt: Path, **kw) -> Path:
    cfg = {"name": "f", "env": {"model": str(ckpt), "num_steps": 2, "images_per_env": 1, "bank_size": 4,
                                "bit_choices": [4, 8], "quant_preset": "plain"}, "num_envs": 2, "wandb": "disabled",
           **kw}
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def test_ppo_jax_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_ckpt):
    cfg = run_config(tmp_path, tiny_ckpt, agent="ppo_jax", total_timesteps=64, checkpoint_every=8,
                     agent_kwargs={"num_steps": 4, "num_minibatches": 1})
    killed, full = tmp_path / "killed", tmp_path / "full"
    p = start_slow(["train", "--config", str(cfg), "--run-dir", str(killed)], 1.0, tmp_path)
    kill_when(p, lambda: list((killed / "checkpoints").glob("ppo_*.json")) and rows_past(
        killed, 8 * int(sorted((killed / "checkpoints").glob("ppo_*.json"))[-1].stem[4:])))
    assert not (killed / "policy").exists()
    assert main(["train", "--config", str(cfg), "--run-dir", str(killed)]) == 0
    assert main(["train", "--config", str(cfg), "--run-dir", str(full)]) == 0
    assert (killed / "policy" / "policy.msgpack").read_bytes() == (full / "policy" / "policy.msgpack").read_bytes()
    assert steps(killed) == list(range(8, 65, 8))
    assert read_metrics(killed / "metrics.jsonl") == read_metrics(full / "metrics.jsonl")


def test_denoiser_killed_and_resumed_equals_uninterrupted(tmp_path):
    args = ["denoiser", "train", "--data", "digits", "--preset", "tiny", "--steps", "30", "--batch-size", "4",
            "--log-every", "1", "--ckpt-every", "5", "--wandb", "disabled"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    p = start_slow(args + ["--out", str(killed)], 0.5, tmp_path)

    def ready():
        if not (killed / "meta.json").exists():
            return False
        done = json.loads((killed / "meta.json").read_text())["train"]["steps"]
        return rows_past(killed, done)

    kill_when(p, ready)
    assert main(args + ["--out", str(killed)]) == 0
    assert main(args + ["--out", str(full)]) == 0
    assert (killed / "weights.msgpack").read_bytes() == (full / "weights.msgpack").read_bytes()
    assert steps(killed) == list(range(1, 31))
    assert read_metrics(killed / "metrics.jsonl") == read_metrics(full / "metrics.jsonl")


def test_sb3_killed_and_resumed_logs_each_step_once(tmp_path, tiny_ckpt, capsys):
    cfg = run_config(tmp_path, tiny_ckpt, agent="ppo", total_timesteps=96, checkpoint_every=8,
                     agent_kwargs={"n_steps": 4, "batch_size": 8, "n_epochs": 1})
    killed = tmp_path / "killed"
    p = start_slow(["train", "--config", str(cfg), "--run-dir", str(killed)], 1.0, tmp_path)

    def ready():
        ck = sorted((killed / "checkpoints").glob("step_*.zip"))
        return bool(ck) and rows_past(killed, int(ck[-1].stem[5:]))

    kill_when(p, ready)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--run-dir", str(killed)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed"] is True and summary["timesteps"] == 96
    s = steps(killed)
    assert s == sorted(set(s)) and s[-1] == 96  # each step once, in order, to the end
    # the final policy exists, carries the run's fingerprint, loads, counts every step and acts
    from stable_baselines3 import PPO

    from qpolicy.agents.sb3 import load_sb3_policy, zip_fingerprint

    assert (killed / "policy.zip").exists()
    assert zip_fingerprint(killed / "policy.zip") == yaml.safe_load((killed / "config.yaml").read_text())["fingerprint"]
    model = PPO.load(killed / "policy.zip", device="cpu")
    assert model.num_timesteps == 96
    obs = np.stack([model.observation_space.sample() for _ in range(3)])
    act = load_sb3_policy(killed, "ppo")(obs)
    assert act.shape == (3, *model.action_space.shape) and all(model.action_space.contains(a) for a in act)
    # SB3 checkpoints hold the model and optimizer but not the envs' states or torch's RNG, so a resumed SB3 run
    # continues correctly but is not bit-identical to an uninterrupted one (the JAX agents are).


def test_second_concurrent_writer_is_refused(tmp_path, tiny_ckpt):
    cfg = run_config(tmp_path, tiny_ckpt, agent="ppo_jax", total_timesteps=64, checkpoint_every=8,
                     agent_kwargs={"num_steps": 4, "num_minibatches": 1})
    run = tmp_path / "run"
    first = start_slow(["train", "--config", str(cfg), "--run-dir", str(run)], 1.0, tmp_path)
    try:
        t0 = time.time()
        while not (run / ".qpolicy.lock").exists() or not (run / ".qpolicy.lock").read_text():
            assert first.poll() is None and time.time() - t0 < 300
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "qpolicy.cli", "train", "--config", str(cfg), "--run-dir",
                                 str(run)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [second.stderr.strip()]
        assert f"is in use by pid {first.pid} on " in second.stderr
        assert first.poll() is None  # the first writer goes on
    finally:
        first.kill()
        first.wait()
