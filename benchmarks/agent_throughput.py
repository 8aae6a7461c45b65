"""JAX-native PPO vs SB3 PPO: env decisions per second on the same env, same device, side by side.

    python benchmarks/agent_throughput.py --model digits16 --num-envs 16 --timesteps 8192 \
        --out benchmarks/results/agent_throughput_cpu_digits16.json

Both train the same per-step env (T steps, B images per env, tied bits) with the same rollout length
and num_envs; JAX PPO's whole update loop is one jitted function (compile time reported apart), SB3
steps the env through the VecEnv adapter (one jitted batched env call per step) with its torch MLP on
the CPU. steps/s counts env decisions after warm-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax

from qpolicy.agents import ppo_jax
from qpolicy.envs import make_core, make_sb3_vec_env
from qpolicy.io import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="digits16")
    p.add_argument("--num-envs", type=int, nargs="+", default=[16])
    p.add_argument("--num-steps", type=int, default=10, help="sampler steps (episode length)")
    p.add_argument("--images-per-env", type=int, default=2)
    p.add_argument("--rollout", type=int, default=32, help="PPO rollout length per env")
    p.add_argument("--timesteps", type=int, default=8192)
    p.add_argument("--out", default=None)
    p.add_argument("--device-name", default=None)
    a = p.parse_args()
    env_kw = dict(model=a.model, num_steps=a.num_steps, images_per_env=a.images_per_env, bank_size=64)
    rows = []
    for n in a.num_envs:
        core = make_core(**env_kw)
        cfg = ppo_jax.PPOConfig(num_envs=n, num_steps=a.rollout, total_timesteps=a.timesteps,
                                num_minibatches=4, update_epochs=4)
        res = ppo_jax.train(core, cfg, progress=False)
        from stable_baselines3 import PPO

        venv = make_sb3_vec_env(n, seed=0, **env_kw)
        model = PPO("MlpPolicy", venv, n_steps=a.rollout, batch_size=n * a.rollout // 4, n_epochs=4, device="cpu",
                    verbose=0, seed=0)
        model.learn(n * a.rollout)  # warm-up: env compile + torch init
        t = time.perf_counter()
        model.learn(a.timesteps, reset_num_timesteps=False)
        sb3 = a.timesteps / (time.perf_counter() - t)
        row = {"num_envs": n, "jax_ppo_steps_s": res.env_steps_per_s, "jax_ppo_compile_s": res.compile_s,
               "sb3_ppo_steps_s": sb3, "speedup": res.env_steps_per_s / sb3}
        rows.append(row)
        print(f"num_envs {n:4d}: JAX PPO {row['jax_ppo_steps_s']:9.1f} steps/s (compile {res.compile_s:.1f}s) | "
              f"SB3 PPO {sb3:9.1f} steps/s | x{row['speedup']:.1f}", flush=True)
    out = {"benchmark": "agent_throughput", "model": a.model, "num_steps": a.num_steps,
           "images_per_env": a.images_per_env, "rollout": a.rollout, "timesteps": a.timesteps,
           "machine": {"device": a.device_name or jax.devices()[0].device_kind, "platform": platform.platform(),
                       "cpu_count": os.cpu_count(), "jax": jax.__version__}, "rows": rows}
    if a.out:
        atomic_write_json(a.out, out)


if __name__ == "__main__":
    main()
