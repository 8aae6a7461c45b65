"""Stable-Baselines3 glue: agent classes, the relaxed-bits wrapper for SAC, the progress/checkpoint callback,
training and loading of SB3 policies for qpolicy runs (:mod:`qpolicy.runs`)."""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from qpolicy.tracking import Tracker

SB3_AGENTS = ("ppo", "a2c", "sac")


def sb3_class(agent: str):
    from stable_baselines3 import A2C, PPO, SAC

    return {"ppo": PPO, "a2c": A2C, "sac": SAC}[agent]


def sb3_kwargs(agent: str) -> set[str]:
    """Keyword arguments the agent's SB3 constructor accepts (those a run config may set)."""
    sig = inspect.signature(sb3_class(agent).__init__)
    return set(sig.parameters) - {"self", "policy", "env", "seed", "device", "verbose"}


def relaxed_to_index(actions: np.ndarray, nvec: np.ndarray) -> np.ndarray:
    """HAQ-style relaxation: a continuous action in [-1, 1] per entry -> the nearest choice index."""
    return np.rint((np.clip(actions, -1, 1) + 1) / 2 * (np.asarray(nvec) - 1)).astype(np.int64)


def relaxed(venv):
    """Wrap an SB3 VecEnv with MultiDiscrete actions as a Box([-1, 1]^n) env (see relaxed_to_index)."""
    from gymnasium import spaces
    from stable_baselines3.common.vec_env import VecEnvWrapper

    nvec = np.asarray(venv.action_space.nvec)

    class RelaxedBits(VecEnvWrapper):
        def __init__(self, v):
            super().__init__(v, action_space=spaces.Box(-1.0, 1.0, (len(nvec),), np.float32))

        def reset(self):
            return self.venv.reset()

        def step_async(self, actions):
            self.venv.step_async(relaxed_to_index(actions, nvec))

        def step_wait(self):
            return self.venv.step_wait()

    return RelaxedBits(venv)


class ProgressCallback:
    """SB3 callback: tqdm bar with return / error / cost, metrics.jsonl + wandb, periodic checkpoints."""

    def __new__(cls, *a, **k):
        from stable_baselines3.common.callbacks import BaseCallback

        class CB(BaseCallback):
            def __init__(self, tracker, bar, run_dir, every):
                super().__init__()
                self.tracker, self.bar, self.run_dir, self.every = tracker, bar, Path(run_dir), every
                self.ret = np.zeros(0)
                self.done_stats: list[tuple[float, float, float]] = []
                self.last_ckpt = 0

            def _on_training_start(self):
                self.ret = np.zeros(self.training_env.num_envs)
                self.last_ckpt = self.num_timesteps

            def _on_step(self):
                infos, rew, dones = self.locals["infos"], self.locals["rewards"], self.locals["dones"]
                self.ret += rew
                for i in np.flatnonzero(dones):
                    self.done_stats.append((self.ret[i], infos[i]["error"], infos[i]["cost"]))
                    self.ret[i] = 0
                self.bar.update(self.training_env.num_envs)
                return True

            def _on_rollout_end(self):
                # log, then checkpoint at the same step: a run resumed from this checkpoint keeps exactly the rows
                # logged up to it (metrics.jsonl is truncated to the checkpoint's step on resume)
                if self.done_stats:
                    r, e, c = np.mean(self.done_stats, axis=0)
                    self.done_stats = []
                    self.bar.set_postfix(ret=f"{r:.3f}", err=f"{e:.3g}", cost=f"{c:.4f}")
                    self.tracker.log({"episode_return": r, "final_error": e, "cost": c}, self.num_timesteps)
                if self.num_timesteps - self.last_ckpt >= self.every:
                    self.last_ckpt = self.num_timesteps
                    save_sb3(self.model, self.run_dir / "checkpoints" / f"step_{self.num_timesteps:09d}.zip")

        return CB(*a, **k)


#: attribute of an SB3 model saved into its zip (policy.zip, checkpoints): the run config's fingerprint
FINGERPRINT_ATTR = "qpolicy_fingerprint"


def save_sb3(model, path: Path) -> None:
    """Save atomically (the model carries its run's fingerprint in the zip's data, see :func:`zip_fingerprint`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)


def zip_fingerprint(path: Path) -> str | None:
    """The run fingerprint stored in an SB3 zip (None if absent); ValueError naming the file if it is no SB3 zip."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            data = json.loads(z.read("data"))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a readable stable-baselines3 zip ({e}); delete it to start over") from None
    fp = data.get(FINGERPRINT_ATTR)
    return fp if isinstance(fp, str) else None


def train_sb3(cfg: Any, run_dir: Path, *, progress: bool, t0: float) -> dict[str, Any]:
    """Train an SB3 agent for a :class:`qpolicy.runs.RunConfig`; resumes from the latest checkpoint in ``run_dir``.
    Writes checkpoints/step_*.zip, policy.zip and metrics; returns a summary."""
    from qpolicy.envs import make_sb3_vec_env


    venv = make_sb3_vec_env(cfg.num_envs, layerwise=cfg.layerwise, seed=cfg.seed, **cfg.env)
    if cfg.agent == "sac":
        venv = relaxed(venv)
    algo = sb3_class(cfg.agent)
    from qpolicy.rundir import check_fingerprint

    ckpts = sorted((run_dir / "checkpoints").glob("step_*.zip"))
    resume = bool(ckpts)
    fp = cfg.fingerprint()
    if resume:
        check_fingerprint(zip_fingerprint(ckpts[-1]), fp, what=f"checkpoint {ckpts[-1].name}", where=run_dir)
        model = algo.load(ckpts[-1], env=venv, device="cpu")
    else:
        model = algo("MlpPolicy", venv, seed=cfg.seed, device="cpu", verbose=0, **sb3_defaults(cfg))
    setattr(model, FINGERPRINT_ATTR, fp)
    tracker = Tracker(run_dir, config=cfg.to_dict(), mode=cfg.wandb, name=cfg.name,
                      resume_at=model.num_timesteps if resume else None)
    bar = tqdm(total=cfg.total_timesteps, initial=model.num_timesteps, desc=f"train {cfg.agent}", unit="step",
               disable=not progress)
    try:
        cb = ProgressCallback(tracker, bar, run_dir, cfg.checkpoint_every)
        remaining = max(cfg.total_timesteps - model.num_timesteps, 0)
        if remaining:
            model.learn(remaining, callback=cb, reset_num_timesteps=not resume, progress_bar=False)
            save_sb3(model, run_dir / "checkpoints" / f"step_{model.num_timesteps:09d}.zip")
        save_sb3(model, run_dir / "policy.zip")
    finally:
        bar.close()
        tracker.close()
        venv.close()
    return {"run_dir": str(run_dir), "agent": cfg.agent, "timesteps": int(model.num_timesteps),
            "wall_s": time.time() - t0, "resumed": resume}


def sb3_defaults(cfg: Any) -> dict[str, Any]:
    """The SB3 constructor keywords of a run: qpolicy's defaults for small envs, then the config's agent_kwargs."""
    kw = {"n_steps": 32, "batch_size": 64} if cfg.agent == "ppo" else {}
    return {**kw, **cfg.agent_kwargs}


#: SB3 constructor keywords checked before a run starts: (rule for qpolicy.config.check)
_SB3_RULES = {"n_steps": dict(kind="int", lo=1), "batch_size": dict(kind="int", lo=2),
              "n_epochs": dict(kind="int", lo=1), "gamma": dict(kind="real", lo=0, hi=1),
              "gae_lambda": dict(kind="real", lo=0, hi=1), "ent_coef": dict(kind="real", lo=0),
              "vf_coef": dict(kind="real", lo=0), "max_grad_norm": dict(kind="real", lo=0, lo_open=True),
              "clip_range": dict(kind="real", lo=0, lo_open=True), "learning_rate": dict(kind="real", lo=0,
                                                                                          lo_open=True),
              "buffer_size": dict(kind="int", lo=1), "learning_starts": dict(kind="int", lo=0),
              "tau": dict(kind="real", lo=0, hi=1), "train_freq": dict(kind="int", lo=1),
              "gradient_steps": dict(kind="int", lo=-1)}


def check_sb3_kwargs(cfg: Any) -> None:
    """Validate a run's SB3 keywords before anything is written (SB3 itself fails late, with a traceback):
    ValueError naming ``agent_kwargs.<field>`` and the accepted values."""
    from qpolicy.config import check

    kw = sb3_defaults(cfg)
    for k, rule in _SB3_RULES.items():
        if k in kw and not callable(kw[k]):  # learning_rate / clip_range may be schedules in the Python API
            check(f"agent_kwargs.{k}", kw[k], **rule)
    if cfg.agent == "ppo":
        if kw["n_steps"] * cfg.num_envs < 2:
            raise ValueError(f"agent_kwargs.n_steps x num_envs must be > 1 for PPO (advantage normalisation), got "
                             f"{kw['n_steps']} x {cfg.num_envs}")


def load_sb3_policy(run_dir: Path, agent: str) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs (N, D)) -> deterministic actions (choice indices; SAC's relaxed actions mapped to indices by the
    caller) of the SB3 policy in ``run_dir/policy.zip``."""
    f = Path(run_dir) / "policy.zip"
    if not f.exists():
        raise FileNotFoundError(f"no trained policy in {run_dir} (expected policy.zip); run `qpolicy train` first")
    model = sb3_class(agent).load(f, device="cpu")
    return lambda obs: model.predict(obs, deterministic=True)[0]
