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
                if self.num_timesteps - self.last_ckpt >= self.every:
                    self.last_ckpt = self.num_timesteps
                    save_sb3(self.model, self.run_dir / "checkpoints" / f"step_{self.num_timesteps:09d}.zip")
                return True

            def _on_rollout_end(self):
                if not self.done_stats:
                    return
                r, e, c = np.mean(self.done_stats, axis=0)
                self.done_stats = []
                self.bar.set_postfix(ret=f"{r:.3f}", err=f"{e:.3g}", cost=f"{c:.4f}")
                self.tracker.log({"episode_return": r, "final_error": e, "cost": c}, self.num_timesteps)

        return CB(*a, **k)


def save_sb3(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.zip")
    model.save(tmp)
    os.replace(tmp, path)


def train_sb3(cfg: Any, run_dir: Path, *, progress: bool, t0: float) -> dict[str, Any]:
    """Train an SB3 agent for a :class:`qpolicy.runs.RunConfig`; resumes from the latest checkpoint in ``run_dir``.
    Writes checkpoints/step_*.zip, policy.zip and metrics; returns a summary."""
    from qpolicy.envs import make_sb3_vec_env


    venv = make_sb3_vec_env(cfg.num_envs, layerwise=cfg.layerwise, seed=cfg.seed, **cfg.env)
    if cfg.agent == "sac":
        venv = relaxed(venv)
    algo = sb3_class(cfg.agent)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.zip"))
    resume = bool(ckpts)
    if resume:
        model = algo.load(ckpts[-1], env=venv, device="cpu")
    else:
        kw = {"n_steps": 32, "batch_size": 64} if cfg.agent == "ppo" else {}
        kw = {**kw, **cfg.agent_kwargs}
        model = algo("MlpPolicy", venv, seed=cfg.seed, device="cpu", verbose=0, **kw)
    tracker = Tracker(run_dir, config=cfg.to_dict(), mode=cfg.wandb, name=cfg.name, resume=resume)
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


def load_sb3_policy(run_dir: Path, agent: str) -> Callable[[np.ndarray], np.ndarray]:
    """act(obs (N, D)) -> deterministic actions (choice indices; SAC's relaxed actions mapped to indices by the
    caller) of the SB3 policy in ``run_dir/policy.zip``."""
    f = Path(run_dir) / "policy.zip"
    if not f.exists():
        raise FileNotFoundError(f"no trained policy in {run_dir} (expected policy.zip); run `qpolicy train` first")
    model = sb3_class(agent).load(f, device="cpu")
    return lambda obs: model.predict(obs, deterministic=True)[0]
