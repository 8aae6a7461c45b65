"""Post-training quantization: static activation ranges calibrated per (layer, step bucket), stored with the
model or cached.

``qcfg`` arguments are :class:`qpolicy.engine.QuantConfig` objects (only ``a_spec`` and ``range_buckets`` are read).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .banks import BANK_SEEDS, cache_dir
from .denoiser import Denoiser, weights_hash
from .diffusion import Sampler, image_keys, image_noise, sampler_step
from .io import save_npy
from .layers import activation_interceptor
from .quant import ACT_DEFAULT, range_from


def calibrate(den: Denoiser, sampler: Sampler, qcfg: Any, *, n: int = 32, seed: int = BANK_SEEDS["calib"]
              ) -> jax.Array:
    """Static activation ranges (range_buckets, L, 2): min/max of each layer's input over FP trajectories
    of ``n`` calibration images, pooled within each step bucket ((-absmax, absmax) for a symmetric
    activation spec). Static ranges are per tensor whatever the spec's granularity."""
    L = len(den.layers)
    keys = image_keys(seed, n)

    def ranges_at(x, i):
        rec: dict[int, tuple] = {}

        def fn(l, a):  # per-tensor range of this call; symmetric specs keep (-absmax, absmax)
            lo, hi = range_from(a, ACT_DEFAULT)
            if qcfg.a_spec.symmetric:
                m = jnp.maximum(-jnp.min(lo), jnp.max(hi))
                rec[l] = (-m, m)
            else:
                rec[l] = (jnp.min(lo), jnp.max(hi))
            return a

        t = jnp.full((x.shape[0],), sampler.timesteps[i], jnp.int32)
        with nn.intercept_methods(activation_interceptor(den.layers, fn)):
            eps = den(x, t)
        r = jnp.stack([jnp.stack(rec[l]) for l in range(L)])
        return sampler_step(sampler, x, eps, i, keys), r

    @jax.jit
    def run():
        _, r = jax.lax.scan(ranges_at, image_noise(keys, 0, den.image_shape), jnp.arange(sampler.num_steps))
        return r  # (S, L, 2)

    r = run()
    b = (np.arange(sampler.num_steps) * qcfg.range_buckets) // sampler.num_steps
    table = [jnp.stack([r[b == k, :, 0].min(0), r[b == k, :, 1].max(0)], -1) for k in range(qcfg.range_buckets)]
    return jnp.stack(table)


def calib_tag(den: Denoiser, sampler: Sampler, qcfg: Any, n: int) -> str:
    """File stem of a calibration table: layer hash, sampler (kind, steps, eta), buckets, images, and the
    activation spec's symmetry."""
    sym = "sym" if qcfg.a_spec.symmetric else "asym"
    eta = f"_eta{sampler.eta:g}" if sampler.kind == "ddim" and sampler.eta else ""
    return f"{den.layer_hash}_{sampler.kind}{sampler.num_steps}{eta}_b{qcfg.range_buckets}_n{n}_{sym}"


def model_calib_path(den: Denoiser, sampler: Sampler, qcfg: Any, n: int) -> Path | None:
    """Where a calibration table stored with the model lives: <checkpoint>/calib/<tag>.npy (None for
    wrapped models that have no checkpoint folder)."""
    d = den.metadata.get("checkpoint_dir")
    return Path(d) / "calib" / f"{calib_tag(den, sampler, qcfg, n)}.npy" if d else None


def static_act_ranges(den: Denoiser, sampler: Sampler, qcfg: Any, calib_n: int = 32) -> jax.Array:
    """The (range_buckets, L, 2) static activation ranges for this model and sampler: the table stored with the
    model (``qpolicy calibrate``) if there is one, else the on-disk cache, else calibrated now (and cached)."""
    stored = model_calib_path(den, sampler, qcfg, calib_n)
    cached = cache_dir() / "calib" / f"{den.name}_{weights_hash(den)}_{calib_tag(den, sampler, qcfg, calib_n)}.npy"
    path = next((p for p in (stored, cached) if p is not None and p.exists()), None)
    if path is not None:
        return jnp.asarray(np.load(path))
    table = calibrate(den, sampler, qcfg, n=calib_n)
    save_npy(cached, table)
    return table
