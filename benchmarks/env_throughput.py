"""Env throughput: vector-env and raw jitted core steps/s vs num_envs, beside a plain FP forward on the
same images, plus the compile count over a long random-action rollout.

    python benchmarks/env_throughput.py --model digits16 --num-envs 1 8 32 --steps 20 \
        --out benchmarks/results/env_throughput_cpu_digits16.json

Rows (one per num_envs n, B = images per env, so one env step denoises n*B images):
  vec_steps_s / vec_images_s   gymnasium VectorEnv.step (host<->device transfers, info dicts included)
  core_steps_s / core_images_s the jitted vmapped core step alone (device arrays, no host transfer)
  fp_forward_ms                one plain FP denoiser forward on n*B images (jitted)
  ratio_core_over_fp           core step time / FP forward time (DESIGN target <= 1.5)
compiles_after_warmup: traces of the core's batched step/reset (and jit cache growth) during
--compile-steps vector-env steps with random bits after one warm-up episode (target 0).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.io import atomic_write_json
from qpolicy.envs import QuantDiffusionVectorEnv


def _time(fn, reps: int) -> float:
    """Seconds per call (median of 3 rounds of ``reps`` calls)."""
    out = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            r = fn()
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t) / reps)
    return float(np.median(out))


def _cache_size(f) -> int:
    try:
        return int(f._cache_size())
    except Exception:  # noqa: BLE001 (private jax API; trace counts are the primary measure)
        return -1


def bench(args) -> dict:
    rows = []
    rng = np.random.default_rng(0)
    for n in args.num_envs:
        venv = QuantDiffusionVectorEnv(n, model=args.model, num_steps=args.sampler_steps,
                                       images_per_env=args.images_per_env,
                                       bank_size=max(args.bank_size, args.images_per_env),
                                       tie_weights_activations=True, batched_conv=args.batched_conv)
        core, params = venv.core, venv.params
        t0 = time.perf_counter()
        venv.reset(seed=0)
        acts = [venv.action_space.sample() for _ in range(args.steps)]
        for k in range(core.episode_length):  # warm-up: one full episode (compiles, autoreset)
            venv.step(acts[k % len(acts)])
        warm_s = time.perf_counter() - t0
        it = iter(range(10**9))
        vec_s = _time(lambda: venv.step(acts[next(it) % len(acts)])[1], args.steps)

        key = jax.random.key(1)
        _, states = core.jit_reset_batch(key, params, n)
        dev_acts = jnp.asarray(np.stack(acts[:4]))
        it2 = iter(range(10**9))

        def core_step():
            return core.jit_step_batch(key, states, dev_acts[next(it2) % 4], params)[2]

        core_step()
        core_s = _time(core_step, args.steps)

        den = core.engine.den
        x = jnp.asarray(rng.standard_normal((n * args.images_per_env, *den.image_shape)), jnp.float32)
        t = jnp.full((x.shape[0],), 500 % den.schedule.num_timesteps, jnp.int32)
        fp = jax.jit(lambda p, x, t: den.apply(p, x, t))
        jax.block_until_ready(fp(den.params, x, t))
        fp_s = _time(lambda: fp(den.params, x, t), args.steps)

        row = {"num_envs": n, "images_per_step": n * args.images_per_env, "warmup_s": warm_s,
               "vec_steps_s": n / vec_s, "vec_images_s": n * args.images_per_env / vec_s,
               "core_steps_s": n / core_s, "core_images_s": n * args.images_per_env / core_s,
               "core_step_ms": core_s * 1e3, "fp_forward_ms": fp_s * 1e3, "ratio_core_over_fp": core_s / fp_s}
        rows.append(row)
        print(f"  n={n:5d}  vec {row['vec_steps_s']:9.1f} steps/s {row['vec_images_s']:10.1f} img/s | core "
              f"{row['core_steps_s']:9.1f} steps/s {row['core_images_s']:10.1f} img/s | fp {fp_s * 1e3:8.2f} ms  "
              f"ratio {row['ratio_core_over_fp']:.2f}", flush=True)

    # compile count over a long random-action rollout (after the warm-up episode above)
    n = args.compile_envs or args.num_envs[0]
    venv = QuantDiffusionVectorEnv(n, model=args.model, num_steps=args.sampler_steps,
                                   images_per_env=args.images_per_env,
                                   bank_size=max(args.bank_size, args.images_per_env), batched_conv=args.batched_conv)
    core = venv.core
    venv.reset(seed=1)
    for _ in range(core.episode_length):
        venv.step(venv.action_space.sample())
    venv_step = core.compiled.sharded(venv.sharding)[1]  # the vector env's jitted step (env batch on its devices)
    traces0, cache0 = dict(core.trace_counts), _cache_size(venv_step)
    t0 = time.perf_counter()
    for _ in range(args.compile_steps):
        venv.step(venv.action_space.sample())
    roll_s = time.perf_counter() - t0
    traces = {k: core.trace_counts[k] - traces0.get(k, 0) for k in core.trace_counts}
    cache1 = _cache_size(venv_step)
    compiles = {"num_envs": n, "steps": args.compile_steps, "seconds": roll_s,
                "traces_after_warmup": traces, "compiles_after_warmup": int(sum(traces.values())),
                "jit_cache_growth": cache1 - cache0 if cache0 >= 0 else None}
    print(f"  compiles during {args.compile_steps} random-bit steps after warm-up (n={n}): "
          f"{compiles['compiles_after_warmup']} (jit cache growth {compiles['jit_cache_growth']})")
    dev = jax.devices()[0]
    from qpolicy.batched_conv import resolve
    return {"benchmark": "env_throughput", "model": args.model, "batched_conv": resolve(args.batched_conv),
            "sampler_steps": args.sampler_steps,
            "images_per_env": args.images_per_env, "timed_steps": args.steps,
            "machine": {"name": args.device_name, "platform": dev.platform, "device_kind": dev.device_kind,
                        "cpu_count": os.cpu_count(), "host": platform.platform(), "jax": jax.__version__},
            "rows": rows, "compile_check": compiles}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits16", help="shipped model name or checkpoint folder")
    ap.add_argument("--num-envs", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    ap.add_argument("--images-per-env", type=int, default=4)
    ap.add_argument("--sampler-steps", type=int, default=10, help="T, sampler steps per episode")
    ap.add_argument("--steps", type=int, default=50, help="timed env steps per measurement round")
    ap.add_argument("--compile-steps", type=int, default=1000, help="random-action steps for the compile count")
    ap.add_argument("--compile-envs", type=int, default=None, help="num_envs for the compile count (default: first)")
    ap.add_argument("--bank-size", type=int, default=64)
    ap.add_argument("--batched-conv", default="auto", help="env.batched_conv: auto | xla | im2col | map "
                    "(qpolicy.batched_conv)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--device-name", default=None, help="free-text machine name recorded in the JSON")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"env throughput: model={args.model} T={args.sampler_steps} B={args.images_per_env} on "
          f"{dev.platform}/{dev.device_kind} ({os.cpu_count()} CPUs)")
    res = bench(args)
    print(f"\n{'num_envs':>8} {'images':>7} {'vec steps/s':>12} {'vec img/s':>11} {'core steps/s':>13} "
          f"{'core img/s':>11} {'core ms':>8} {'fp ms':>8} {'q/fp':>6}")
    for r in res["rows"]:
        print(f"{r['num_envs']:>8} {r['images_per_step']:>7} {r['vec_steps_s']:>12.1f} {r['vec_images_s']:>11.1f} "
              f"{r['core_steps_s']:>13.1f} {r['core_images_s']:>11.1f} {r['core_step_ms']:>8.2f} "
              f"{r['fp_forward_ms']:>8.2f} {r['ratio_core_over_fp']:>6.2f}")
    c = res["compile_check"]
    print(f"compiles after warm-up over {c['steps']} steps: {c['compiles_after_warmup']}")
    if args.out:
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
