"""Post-training quantization: static activation ranges calibrated per (layer, step bucket) (stored with the model
or cached), bias-correction statistics, and shortcut splitting of concatenated layer inputs.

``qcfg`` arguments are :class:`qpolicy.engine.QuantConfig` objects (only ``a_spec`` and ``range_buckets`` are read).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from .banks import BANK_SEEDS, cache_dir
from .denoiser import Denoiser, weights_hash
from .diffusion import Sampler, image_keys, image_noise, sampler_step
from .io import load_cached_array, save_cached_array
from .layers import activation_interceptor, path_tuple
from .quant import ACT_DEFAULT, QuantSpec, fake_quant, range_from


def fp_layer_stats(den: Denoiser, sampler: Sampler, stat: Callable[[int, jax.Array], Any], layers: Sequence[int], *,
                   n: int = 32, seed: int = BANK_SEEDS["calib"]) -> dict[int, Any]:
    """``{l: stat(l, input of layer l) stacked over sampler steps}`` along FP trajectories of ``n`` calibration
    images (one jitted scan). ``stat`` returns a pytree of arrays; each leaf gains a leading step axis (S, ...)."""
    keys = image_keys(seed, n)
    wanted = tuple(layers)

    def at(x, i):
        rec: dict[int, Any] = {}

        def fn(l, a):
            if l in wanted:
                rec[l] = stat(l, a)
            return a

        t = jnp.full((x.shape[0],), sampler.timesteps[i], jnp.int32)
        with nn.intercept_methods(activation_interceptor(den.layers, fn)):
            eps = den(x, t)
        return sampler_step(sampler, x, eps, i, keys), [rec[l] for l in wanted]

    @jax.jit
    def run():
        return jax.lax.scan(at, image_noise(keys, 0, den.image_shape), jnp.arange(sampler.num_steps))[1]

    return dict(zip(wanted, run()))


def calibrate(den: Denoiser, sampler: Sampler, qcfg: Any, *, n: int = 32, seed: int = BANK_SEEDS["calib"]
              ) -> jax.Array:
    """Static activation ranges (range_buckets, L, 2): min/max of each layer's input over FP trajectories
    of ``n`` calibration images, pooled within each step bucket ((-absmax, absmax) for a symmetric
    activation spec). Static ranges are per tensor whatever the spec's granularity."""
    def minmax(l, a):  # per-tensor range of this call; symmetric specs keep (-absmax, absmax)
        lo, hi = range_from(a, ACT_DEFAULT)
        if qcfg.a_spec.symmetric:
            m = jnp.maximum(-jnp.min(lo), jnp.max(hi))
            return jnp.stack([-m, m])
        return jnp.stack([jnp.min(lo), jnp.max(hi)])

    L = len(den.layers)
    st = fp_layer_stats(den, sampler, minmax, range(L), n=n, seed=seed)
    r = jnp.stack([st[l] for l in range(L)], 1)  # (S, L, 2)
    b = (np.arange(sampler.num_steps) * qcfg.range_buckets) // sampler.num_steps
    table = [jnp.stack([r[b == k, :, 0].min(0), r[b == k, :, 1].max(0)], -1) for k in range(qcfg.range_buckets)]
    return jnp.stack(table)


#: Layer kinds whose kernel is (..., in, out): a contraction over every axis but the last, input channels at -2.
CHANNEL_LAST_KINDS = ("conv", "dense")


def bias_correctable(den: Denoiser) -> list[int]:
    """Layers whose expected output shift can be folded into their own bias: conv / dense with a single kernel and a
    bias (grouped convs are found and dropped by :func:`input_means`)."""
    out = []
    for l in den.layers:
        node = den.params
        for k in path_tuple(l.path):
            node = node[k]
        if l.kind in CHANNEL_LAST_KINDS and l.weight_names == ("kernel",) and "bias" in node:
            out.append(l.index)
    return out


def input_means(den: Denoiser, sampler: Sampler, *, n: int = 32, seed: int = BANK_SEEDS["calib"]
                ) -> dict[int, jax.Array]:
    """Empirical bias correction statistics (Nagel et al. 2019): ``{l: E[input of layer l] per channel}``, (S, Cin)
    per sampler step, over ``n`` calibration images and all positions, for every :func:`bias_correctable` layer whose
    kernel's input dimension is the input's channel count."""
    layers = bias_correctable(den)
    st = fp_layer_stats(den, sampler, lambda l, a: jnp.mean(a.reshape(-1, a.shape[-1]), 0), layers, n=n, seed=seed)
    return {l: m for l, m in st.items() if m.shape[-1] == den.layers[l].weight_shape[-2]}


def input_splits(den: Denoiser) -> dict[int, tuple[int, ...]]:
    """Shortcut splitting (Q-Diffusion): ``{l: channel sizes}`` for every layer whose input is a concatenation along
    the channel (last) axis, found in the model's jaxpr (works for any interceptable model): each registered layer's
    input is tagged, and the equation producing it is looked up, through nested jitted calls."""
    def tagged(x, t):
        tag = lambda l, a: checkpoint_name(a, f"qpolicy_layer_{l}")
        with nn.intercept_methods(activation_interceptor(den.layers, tag)):
            return den(x, t)

    closed = jax.make_jaxpr(tagged)(jnp.zeros((1, *den.image_shape), jnp.float32), jnp.zeros((1,), jnp.int32))
    out: dict[int, tuple[int, ...]] = {}

    def producer(var, jaxpr):
        for e in jaxpr.eqns:
            if var in e.outvars:
                return e
        return None

    def concat_sizes(var, jaxpr):
        e = producer(var, jaxpr)
        while e is not None and e.primitive.name in ("jit", "pjit", "closed_call", "core_call"):
            inner = e.params.get("jaxpr") or e.params.get("call_jaxpr")
            inner = getattr(inner, "jaxpr", inner)
            if inner is None or not hasattr(inner, "outvars"):
                return None
            var, jaxpr = inner.outvars[e.outvars.index(var)], inner
            e = producer(var, jaxpr)
        if e is None or e.primitive.name != "concatenate":
            return None
        nd = len(var.aval.shape)
        if e.params["dimension"] not in (nd - 1, -1):
            return None
        return tuple(int(v.aval.shape[-1]) for v in e.invars)

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "name" and str(e.params.get("name", "")).startswith("qpolicy_layer_"):
                sizes = concat_sizes(e.invars[0], jaxpr)
                if sizes and len(sizes) > 1:
                    out[int(e.params["name"].rsplit("_", 1)[1])] = sizes
            for p in e.params.values():
                for q in (p if isinstance(p, (tuple, list)) else (p,)):  # cond branches are a tuple
                    inner = getattr(q, "jaxpr", q)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed.jaxpr)
    return out


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
    if stored is not None and stored.exists():
        return jnp.asarray(load_stored_ranges(stored, qcfg.range_buckets, len(den.layers)))
    table = load_cached_array(cached, key=cached.stem)
    if table is not None:
        return jnp.asarray(table)
    table = calibrate(den, sampler, qcfg, n=calib_n)
    save_cached_array(cached, table, key=cached.stem)
    return table


def load_stored_ranges(path: Path, buckets: int, num_layers: int) -> np.ndarray:
    """A calibration table stored with a model (``qpolicy calibrate``): ValueError naming the file when it is
    unreadable, of another shape than (buckets, layers, 2), or not finite."""
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"calibration file {path} is unreadable ({e}); delete it and rerun `qpolicy calibrate`") \
            from None
    if a.shape != (buckets, num_layers, 2) or not np.isfinite(a).all():
        raise ValueError(f"calibration file {path} holds {a.shape} (finite: {bool(np.isfinite(a).all())}), expected "
                         f"finite ({buckets}, {num_layers}, 2); delete it and rerun `qpolicy calibrate`")
    return a


#: Clipping ratios (of the per-channel absmax) searched by :func:`weight_clip_ratios`.
CLIP_GRID = tuple(float(r) for r in np.round(np.linspace(0.5, 1.0, 21), 4))


def weight_clip_ratios(w: jax.Array, spec: QuantSpec, choices: Sequence[int], grid: Sequence[float] = CLIP_GRID
                       ) -> jax.Array:
    """MSE clipping search for a weight (symmetric, per tensor or per channel): for each bit choice (C,) the ratio r
    of the range's absmax minimising ||W − Q(W; absmax = r·absmax)||² per scale entry. Returns ratios
    (C, *scale shape) (1.0 for float passthrough choices)."""
    base = range_from(w, spec)  # absmax in the scale shape
    red = tuple(i for i, (a, b) in enumerate(zip(w.shape, base.shape)) if b == 1 and a != 1)

    ratios = jnp.asarray(grid, jnp.float32)
    bits = jnp.asarray(choices, jnp.int32)
    return _best_ratios(w, base, bits, ratios, spec, red)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _best_ratios(w, base, bits, ratios, spec, red):
    def per_bits(b):
        e = jax.vmap(lambda r: jnp.sum((w - fake_quant(w, b, spec, absmax=r * base)) ** 2, axis=red,
                                       keepdims=True))(ratios)  # (R, *scale shape)
        return jnp.where(b >= 32, 1.0, ratios[jnp.argmin(e, axis=0)])

    return jax.lax.map(per_bits, bits)
