"""Scaling over devices: env and JAX-PPO throughput on meshes of N = 1, 2, 4, ... devices with the same per-device
env batch (weak scaling), and the efficiency throughput(N) / (N * throughput(1)).

    python benchmarks/sharding_scaling.py --host-devices 4 --devices 1 2 4 --envs-per-device 2 \
        --out benchmarks/results/sharding_scaling_cpu_digits16.json

``--host-devices K`` forces K XLA host (CPU) devices (it sets ``XLA_FLAGS`` before jax is imported). Forced host
devices share the machine's cores, so on a CPU the efficiency measures the overhead of the sharded code path (ideal:
1/N of the per-device work each, i.e. efficiency 1/N when the cores are already busy at N = 1), not a speedup; real
scaling needs real devices (GPUs: ``--host-devices 0``).

Rows (one per N; n = N * envs-per-device envs, B images per env):
  env_steps_s     the jitted, sharded batched env step (``Compiled.sharded``), env decisions per second
  env_steps_s_one_device  the same n envs stepped on one device; sharding_overhead = 1 - env_steps_s / that
  ppo_steps_s     ``ppo_jax.train`` env decisions per second after compilation (one seed)
  *_efficiency    steps_s(N) / (N * steps_s(1))
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qpolicy.agents import ppo_jax
    from qpolicy.envs import make_core
    from qpolicy.sharding import env_sharding

    core = make_core(model=args.model, num_steps=args.sampler_steps, images_per_env=args.images_per_env,
                     bank_size=args.bank_size, quant_preset=args.quant_preset, tie_weights_activations=True)
    rng = np.random.default_rng(0)
    rows = []

    def time_env(n: int, n_dev: int) -> tuple[float, float]:
        """(seconds per batched step of n envs on n_dev devices, compile seconds)."""
        es = env_sharding(n, n_dev)
        reset, step = core.compiled.sharded(es)
        params = es.put_replicated(core.default_params)
        key = jax.random.key(0)
        _, states = reset(key, params, n)
        acts = [es.put_envs(jnp.asarray(rng.integers(0, core.C, (n, core.L)), jnp.int32)) for _ in range(4)]
        t0 = time.perf_counter()
        jax.block_until_ready(step(key, states, acts[0], params))
        compile_s = time.perf_counter() - t0
        rounds = []
        for _ in range(3):  # median of 3 rounds of --steps calls (states not carried: same work every call)
            t = time.perf_counter()
            for i in range(args.steps):
                r = step(key, states, acts[i % 4], params)
            jax.block_until_ready(r)
            rounds.append((time.perf_counter() - t) / args.steps)
        return float(np.median(rounds)), compile_s

    for n_dev in args.devices:
        n = n_dev * args.envs_per_device
        env_s, env_compile_s = time_env(n, n_dev)
        one_s = env_s if n_dev == 1 else time_env(n, 1)[0]
        cfg = ppo_jax.PPOConfig(num_envs=n, num_steps=args.ppo_num_steps, num_minibatches=1, update_epochs=1,
                                total_timesteps=n * args.ppo_num_steps * args.ppo_updates, hidden=(64, 64),
                                devices=n_dev)
        res = ppo_jax.train(core, cfg, progress=False, num_chunks=args.ppo_updates)
        row = {"devices": n_dev, "num_envs": n, "images_per_step": n * args.images_per_env,
               "env_step_ms": env_s * 1e3, "env_steps_s": n / env_s, "env_compile_s": env_compile_s,
               "env_steps_s_one_device": n / one_s, "sharding_overhead": 1.0 - one_s / env_s,
               "ppo_steps_s": res.env_steps_per_s, "ppo_compile_s": res.compile_s, "ppo_devices": res.devices}
        rows.append(row)
        print(f"  N={n_dev}  envs={n:4d}  env step {env_s * 1e3:8.2f} ms  {row['env_steps_s']:9.1f} steps/s "
              f"(one device {n / one_s:9.1f}) | ppo {res.env_steps_per_s:9.1f} steps/s", flush=True)
    base = rows[0]
    for r in rows:
        k = r["devices"] / base["devices"]
        r["env_efficiency"] = r["env_steps_s"] / (k * base["env_steps_s"])
        r["ppo_efficiency"] = r["ppo_steps_s"] / (k * base["ppo_steps_s"])
    dev = jax.devices()[0]
    return {"benchmark": "sharding_scaling", "model": args.model, "quant_preset": args.quant_preset,
            "sampler_steps": args.sampler_steps, "images_per_env": args.images_per_env,
            "envs_per_device": args.envs_per_device, "timed_steps": args.steps,
            "ppo": {"num_steps": args.ppo_num_steps, "updates": args.ppo_updates, "hidden": [64, 64]},
            "machine": {"node": platform.node(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                        "platform": dev.platform, "device_kind": dev.device_kind, "devices": len(jax.devices()),
                        "forced_host_devices": args.host_devices, "host": platform.platform(),
                        "jax": jax.__version__, "name": args.device_name},
            "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
    ap.add_argument("--quant-preset", default="ptq")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="mesh sizes N (the first is the base)")
    ap.add_argument("--host-devices", type=int, default=4, help="forced XLA host devices (0: leave XLA_FLAGS alone)")
    ap.add_argument("--envs-per-device", type=int, default=2)
    ap.add_argument("--images-per-env", type=int, default=1)
    ap.add_argument("--sampler-steps", type=int, default=10, help="T, sampler steps per episode")
    ap.add_argument("--bank-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed env steps per measurement round")
    ap.add_argument("--ppo-num-steps", type=int, default=10, help="PPO rollout length")
    ap.add_argument("--ppo-updates", type=int, default=4, help="PPO updates (one per chunk, first one timed too)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--device-name", default=None, help="free-text machine name recorded in the JSON")
    args = ap.parse_args(argv)
    if args.host_devices:
        if "jax" in sys.modules:
            raise SystemExit("--host-devices must be set before jax is imported")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.host_devices}".strip()
    import jax

    from qpolicy.io import atomic_write_json

    if max(args.devices) > len(jax.local_devices()):
        raise SystemExit(f"--devices {args.devices} needs {max(args.devices)} local devices, "
                         f"found {len(jax.local_devices())}")
    dev = jax.devices()[0]
    print(f"sharding scaling: model={args.model} T={args.sampler_steps} B={args.images_per_env} "
          f"{args.envs_per_device} envs/device on {len(jax.devices())} x {dev.platform}/{dev.device_kind} "
          f"({os.cpu_count()} CPUs, {_cpu_name()})", flush=True)
    res = bench(args)
    print(f"\n{'N':>3} {'envs':>5} {'env ms':>8} {'env steps/s':>12} {'env eff':>8} {'1-dev steps/s':>14} "
          f"{'overhead':>9} {'ppo steps/s':>12} {'ppo eff':>8}")
    for r in res["rows"]:
        print(f"{r['devices']:>3} {r['num_envs']:>5} {r['env_step_ms']:>8.2f} {r['env_steps_s']:>12.1f} "
              f"{r['env_efficiency']:>8.2f} {r['env_steps_s_one_device']:>14.1f} {r['sharding_overhead']:>9.2f} "
              f"{r['ppo_steps_s']:>12.1f} {r['ppo_efficiency']:>8.2f}")
    if args.out:
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
