"""Where one batched env step spends its time: the quantized step taken apart, piece by piece.

    python benchmarks/env_step_profile.py --model digits16 --num-envs 256 --images-per-env 4 \
        --out benchmarks/results/env_step_profile_gpu_digits16.json

Each row is one jitted program over n envs x B images (the env batch vmapped, as ``step_batch`` does), timed after
warm-up (median of 3 rounds), with XLA's own cost analysis of the compiled program (FLOPs, bytes accessed):

  fp_forward            the plain FP denoiser on the n*B images (shared weights): the reference
  fp_per_env_weights    the FP denoiser vmapped over envs with one weight copy per env (per-env convolutions)
  weight_quant_only     per-env weights fake-quantized at each env's bits (quantize_params), no activation quant
  quantize_params_only  the per-env weight quantization alone (no forward)
  act_quant_only        shared FP weights, each layer's input fake-quantized at each env's bits (the interceptor)
  engine_step_xla       the full quantized sampler step (engine.step), vmapped over envs, JAX's grouped-conv rule
  engine_step_im2col    the same with the per-env convolutions as batched GEMMs (qpolicy.batched_conv)
  engine_step_map       the same with one plain convolution per env in a loop
  env_step              the env's jitted batched step (engine step + error vs the reference + reward + obs + reset),
                        with env.batched_conv as given (--batched-conv; "auto" by default)

XLA's cost analysis counts a loop body once, so the FLOPs of the "map" rows are one env's.

The differences between rows say which part of the quantized step costs what; ``ratio`` is time / fp_forward.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.batched_conv import BATCHED_CONV_IMPLS
from qpolicy.bits import to_bits
from qpolicy.io import atomic_write_json
from qpolicy.layers import activation_interceptor

from env_throughput import _time  # benchmarks/env_throughput.py (the script's own folder)


def _cost(jitted, *args) -> dict:
    """FLOPs and bytes accessed of the compiled program (XLA's cost analysis; None where the backend has none)."""
    try:
        ca = jitted.lower(*args).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return {"gflops": float(ca.get("flops", float("nan"))) / 1e9,
                "gbytes_accessed": float(ca.get("bytes accessed", float("nan"))) / 1e9}
    except Exception as e:  # noqa: BLE001 (cost analysis is optional diagnostics)
        return {"gflops": None, "gbytes_accessed": None, "cost_error": str(e)[:200]}


def pieces(core, params, n: int, seed: int = 0) -> dict:
    """name -> (jitted fn, args) of each piece of one batched step over n envs (B images each)."""
    eng, B = core.engine, core.B
    den = eng.den
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    _, states = core.jit_reset_batch(key, params, n)
    choices = np.asarray(eng.qcfg.bit_choices)
    acts = jnp.asarray(rng.integers(0, len(choices), (n, core.L)), jnp.int32)
    if not core.tied:
        acts = jnp.concatenate([acts, acts], axis=1)
    bits = to_bits(jnp.asarray(rng.integers(0, len(choices), (n, core.L)), jnp.int32), jnp.asarray(choices))
    x = states.x  # (n, B, H, W, C)
    keys = params.bank_keys[states.idx]  # (n, B)
    i = jnp.asarray(3, jnp.int32)
    t = jnp.full((B,), eng.sampler.timesteps[3], jnp.int32)
    # one weight copy per env, materialised only when that piece is timed (n copies of a large model are GBs)
    stacked = lambda: jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p, (n, *p.shape)) + 0, den.params)  # noqa: E731

    def apply(p, xe, ke):
        return den.apply(p, xe, t, ke if den.conditioning is not None else None)

    def act_only(b, xe, ke):
        with nn.intercept_methods(activation_interceptor(den.layers, eng.act_quant_fn(i, b, None))):
            return apply(den.params, xe, ke)

    return {
        "fp_forward": (jax.jit(lambda p, xf, tf: den.apply(p, xf, tf)),
                       (den.params, x.reshape(n * B, *x.shape[2:]), jnp.full((n * B,), t[0], jnp.int32))),
        "fp_per_env_weights": (jax.jit(jax.vmap(lambda p, xe: den.apply(p, xe, t))), (stacked, x)),
        "weight_quant_only": (jax.jit(jax.vmap(lambda b, xe, ke: apply(eng.quantize_params(b, i), xe, ke))),
                              (bits, x, keys)),
        "quantize_params_only": (jax.jit(jax.vmap(lambda b: eng.quantize_params(b, i))), (bits,)),
        "act_quant_only": (jax.jit(jax.vmap(act_only)), (bits, x, keys)),
        **{f"engine_step_{impl}": (jax.jit(jax.vmap(lambda b, xe, ke, e=eng.with_batched_conv(impl):
                                                    e.step(xe, i, ke, b, b))), (bits, x, keys))
           for impl in BATCHED_CONV_IMPLS},
        "env_step": (core.jit_step_batch, (key, states, acts, params)),
    }


def profile(args) -> dict:
    from qpolicy.envs import QuantDiffusionVectorEnv
    out = []
    dev = jax.devices()[0]
    from qpolicy.batched_conv import resolve
    res = {"benchmark": "env_step_profile", "model": args.model, "preset": args.preset,
           "env_batched_conv": resolve(args.batched_conv),
           "sampler_steps": args.sampler_steps, "images_per_env": args.images_per_env, "timed_steps": args.steps,
           "machine": {"name": args.device_name, "platform": dev.platform, "device_kind": dev.device_kind,
                       "cpu_count": os.cpu_count(), "host": platform.platform(), "jax": jax.__version__},
           "rows": out}
    for n in args.num_envs:
        venv = QuantDiffusionVectorEnv(n, model=args.model, num_steps=args.sampler_steps,
                                       images_per_env=args.images_per_env,
                                       bank_size=max(args.bank_size, args.images_per_env),
                                       tie_weights_activations=True, batched_conv=args.batched_conv,
                                       **({"quant_preset": args.preset} if args.preset else {}))
        core, params = venv.core, venv.params
        rows = {}
        for name, (fn, a) in pieces(core, params, n).items():
            if args.pieces and name not in (*args.pieces, "fp_forward") and n > min(args.num_envs):
                continue
            a = tuple(v() if callable(v) else v for v in a)
            jax.block_until_ready(fn(*a))  # compile and warm up outside the timed rounds
            s = _time(lambda: fn(*a), args.steps)
            rows[name] = {"ms": s * 1e3, **_cost(fn, *a)}
        fp = rows["fp_forward"]["ms"]
        for name, r in rows.items():
            r["ratio"] = r["ms"] / fp
            print(f"  n={n:4d} {name:22s} {r['ms']:9.3f} ms  x{r['ratio']:6.2f}  "
                  f"GFLOP {r['gflops'] if r['gflops'] is None else round(r['gflops'], 2)}  "
                  f"GB {r['gbytes_accessed'] if r['gbytes_accessed'] is None else round(r['gbytes_accessed'], 3)}",
                  flush=True)
        out.append({"num_envs": n, "images_per_step": n * args.images_per_env, "pieces": rows})
        if args.out:  # after every n, so a time limit keeps what was measured
            atomic_write_json(args.out, res)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits16")
    ap.add_argument("--num-envs", type=int, nargs="+", default=[16])
    ap.add_argument("--images-per-env", type=int, default=4)
    ap.add_argument("--sampler-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="timed calls per round")
    ap.add_argument("--bank-size", type=int, default=64)
    ap.add_argument("--batched-conv", default="auto", help="env.batched_conv of the env_step row")
    ap.add_argument("--preset", default=None, help="quantizer preset (default: the engine's default)")
    ap.add_argument("--pieces", nargs="*", default=None,
                    help="pieces timed beyond the smallest num_envs (default: all; fp_forward is always kept)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device-name", default=None)
    args = ap.parse_args(argv)
    profile(args)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
