"""Post-training quantization: static activation ranges calibrated per (layer, step bucket) (stored with the model
or cached), bias-correction statistics, shortcut splitting of concatenated layer inputs, activation clipping
(percentile ranges, MSE-searched clipping ratios per (layer, step bucket, bit choice)), SmoothQuant scale migration,
and the on-disk cache every calibration product goes through.

``qcfg`` arguments are :class:`qpolicy.engine.QuantConfig` objects (only ``a_spec``, ``range_buckets``, ``act_clip``,
``act_percentile``, ``bit_choices`` and ``smooth_alpha`` are read).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
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
from .io import load_cached_array, read_cache, save_cached_array, write_cache
from .layers import activation_interceptor, layer_params
from .quant import ACT_DEFAULT, QuantSpec, fake_quant, percentile_range, range_from


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
            eps = den(x, t, keys)
        return sampler_step(sampler, x, eps, i, keys), [rec[l] for l in wanted]

    @jax.jit
    def run():
        return jax.lax.scan(at, image_noise(keys, 0, den.image_shape), jnp.arange(sampler.num_steps))[1]

    return dict(zip(wanted, run()))


def calibrate(den: Denoiser, sampler: Sampler, qcfg: Any, *, n: int = 32, seed: int = BANK_SEEDS["calib"]
              ) -> jax.Array:
    """Static activation ranges (range_buckets, L, 2): min/max of each layer's input over FP trajectories
    of ``n`` calibration images, pooled within each step bucket ((-absmax, absmax) for a symmetric
    activation spec); with ``act_clip="percentile"`` each step's range is the (100 − p, p) percentiles of the layer's
    input over the n images (p = ``act_percentile``) instead of its min/max. Static ranges are per tensor whatever
    the spec's granularity."""
    pct = qcfg.act_percentile if getattr(qcfg, "act_clip", "none") == "percentile" else None

    def minmax(l, a):  # per-tensor range of this call (all n images); symmetric specs keep (-absmax, absmax)
        lo, hi = act_base_range(a, ACT_DEFAULT, pct)
        if qcfg.a_spec.symmetric:
            m = jnp.maximum(-lo, hi)
            return jnp.stack([-m, m])
        return jnp.stack([lo, hi])

    L = len(den.layers)
    st = fp_layer_stats(den, sampler, minmax, range(L), n=n, seed=seed)
    r = jnp.stack([st[l] for l in range(L)], 1)  # (S, L, 2)
    b = (np.arange(sampler.num_steps) * qcfg.range_buckets) // sampler.num_steps
    table = [jnp.stack([r[b == k, :, 0].min(0), r[b == k, :, 1].max(0)], -1) for k in range(qcfg.range_buckets)]
    return jnp.stack(table)


#: Layer kinds whose kernel is (..., in, out): a contraction over every axis but the last, input channels at -2.
CHANNEL_LAST_KINDS = ("conv", "dense")


def bias_correctable(den: Denoiser, need_bias: bool = True) -> list[int]:
    """Layers whose expected output shift can be folded into their own bias: conv / dense with a single kernel and a
    bias (grouped convs are found and dropped by :func:`input_means`). ``need_bias=False``: every conv / dense with a
    single (..., in, out) kernel (what SmoothQuant can rescale along the input channels)."""
    out = []
    for l in den.layers:
        node = layer_params(den.params, l)
        if l.kind in CHANNEL_LAST_KINDS and l.weight_names == ("kernel",) and ("bias" in node or not need_bias):
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
            return den(x, t, image_keys(0, 1))

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
    pct = f"_p{qcfg.act_percentile:g}" if getattr(qcfg, "act_clip", "none") == "percentile" else ""
    return f"{den.layer_hash}_{sampler.kind}{sampler.num_steps}{eta}_b{qcfg.range_buckets}_n{n}_{sym}{pct}"


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


# ----------------------------------------------------------------------------------------------- on-disk cache
def cached_arrays(kind: str, den: Denoiser, key: Any, compute: Callable[[], dict[tuple, Any]]
                  ) -> dict[tuple, jax.Array]:
    """``compute()`` (a dict of arrays keyed by tuples of ints/strings), cached on disk under
    <cache>/<kind>/<model>_<weights hash>_<hash of key>.npz (written atomically) and read back on the next call."""
    tag = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    path = cache_dir() / kind / f"{den.name}_{weights_hash(den)}_{tag}.npz"
    got = read_cache(path, key=path.stem)  # verified against its sidecar; a bad file is removed and recomputed
    if got is not None:
        with np.load(io.BytesIO(got[0])) as z:
            return {tuple(json.loads(k)): jnp.asarray(z[k]) for k in z.files}
    out = compute()
    buf = io.BytesIO()
    np.savez(buf, **{json.dumps(list(k)): np.asarray(v) for k, v in out.items()})
    write_cache(path, buf.getvalue(), key=path.stem)
    return {k: jnp.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- activation clipping
#: Activation clipping modes: "none" (min/max), "percentile" (the (100 - p, p) percentiles), "mse" (a clipping
#: ratio of the range per (layer, step bucket, bit choice) minimising the activation's quantization MSE).
ACT_CLIP_MODES = ("none", "percentile", "mse")
#: Ratios of the range searched by act_clip="mse".
ACT_CLIP_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)


def act_base_range(v: jax.Array, spec: QuantSpec, percentile: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-tensor ``(lo, hi)`` of ``v``: its min/max, or its (100 − p, p) percentiles (:func:`percentile_range`)."""
    if percentile is not None:
        return percentile_range(v, percentile)
    lo, hi = range_from(v, ACT_DEFAULT)
    return jnp.min(lo), jnp.max(hi)


def quant_act(v: jax.Array, bits: jax.Array, spec: QuantSpec, lo: jax.Array, hi: jax.Array,
              ratio: jax.Array | float = 1.0) -> jax.Array:
    """``v`` fake-quantized per tensor on the range ``ratio · (lo, hi)`` ((-m, m), m = ratio · max(−lo, hi), for a
    symmetric spec): the one activation quantizer of the engine and of its calibration searches."""
    if spec.symmetric:
        return fake_quant(v, bits, spec, absmax=ratio * jnp.maximum(-lo, hi))
    return fake_quant(v, bits, spec, minmax=(ratio * lo, ratio * hi))


def act_clip_ratios(den: Denoiser, sampler: Sampler, qcfg: Any, splits: dict[int, tuple[int, ...]],
                    scales: dict[int, jax.Array], *, per_image: bool, n: int = 32, seed: int = BANK_SEEDS["calib"]
                    ) -> dict[int, jax.Array]:
    """MSE activation clipping: ``{l: (range_buckets, parts, C) ratios}``, for each layer's input part (shortcut
    splitting ``splits``; divided by its SmoothQuant ``scales`` first), step bucket and bit choice, the ratio of
    :data:`ACT_CLIP_GRID` minimising the summed squared quantization error of the input over FP trajectories of ``n``
    calibration images (every step). The base range is each image's (``per_image``: dynamic ranges) or the
    call's, over all n images (static ranges). Float passthrough choices get 1."""
    grid = jnp.asarray(ACT_CLIP_GRID, jnp.float32)
    bits = jnp.asarray(qcfg.bit_choices, jnp.int32)
    spec = qcfg.a_spec

    def errors(l, a):  # (parts, C, R) squared errors at this step
        if l in scales:
            a = a / scales[l]
        sizes = splits.get(l) if per_image else None
        parts = jnp.split(a, np.cumsum(sizes)[:-1].tolist(), axis=-1) if sizes and a.shape[-1] == sum(sizes) else [a]

        def err(p):
            def one(v):  # (C, R) for one image (per_image) or the whole call
                lo, hi = act_base_range(v, spec)
                return jax.vmap(lambda b: jax.vmap(lambda r: jnp.sum((quant_act(v, b, spec, lo, hi, r) - v) ** 2))(
                    grid))(bits)
            return jax.vmap(one)(p).sum(0) if per_image else one(p)

        return jnp.stack([err(p) for p in parts])

    L = len(den.layers)
    st = fp_layer_stats(den, sampler, errors, range(L), n=n, seed=seed)
    b = (np.arange(sampler.num_steps) * qcfg.range_buckets) // sampler.num_steps
    out = {}
    for l in range(L):
        e = jnp.stack([st[l][b == k].sum(0) for k in range(qcfg.range_buckets)])  # (buckets, parts, C, R)
        out[l] = jnp.where(bits[None, None, :] >= 32, 1.0, grid[jnp.argmin(e, -1)])
    return out


# ----------------------------------------------------------------------------------------------- SmoothQuant
#: Migration strengths α searched per layer by :func:`smooth_scales` (0 = no migration is always a candidate).
SMOOTH_ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75)


def smooth_factors(act_absmax: jax.Array, w: jax.Array, alpha: float) -> jax.Array:
    """SmoothQuant (Xiao et al. 2023) per-input-channel scales s_j = max|X_j|^α / max|W_j|^(1−α) (W (..., in, out)),
    so that (X / s) · (s · W) = X · W; 1 for channels that are zero in X or W."""
    wmax = jnp.max(jnp.abs(w.reshape(-1, w.shape[-2], w.shape[-1])), axis=(0, 2))
    ok = (act_absmax > 0) & (wmax > 0)
    s = jnp.where(ok, jnp.maximum(act_absmax, 1e-12) ** alpha / jnp.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
    return jnp.where(alpha == 0, 1.0, s)


def _smooth_noise(stats: dict[str, jax.Array], w: jax.Array, s: jax.Array, bw: int, ba: int) -> jax.Array:
    """Output-noise model of a layer at (bw, ba) bits with inputs divided by s and weights multiplied by s: uniform
    rounding noise (step²/12) of the per-tensor activation grid over the range of X/s and of each output channel's
    weight grid, propagated through the layer in the original basis with the inputs' per-channel second moments."""
    w3 = w.reshape(-1, w.shape[-2], w.shape[-1])  # (K, in, out)
    span = jnp.maximum(jnp.max(stats["hi"] / s), 0.0) - jnp.minimum(jnp.min(stats["lo"] / s), 0.0)
    da = span / (2.0 ** ba - 1)
    act = da ** 2 / 12 * jnp.sum(s ** 2 * jnp.sum(w3 ** 2, axis=(0, 2)))
    dw = jnp.max(jnp.abs(w3 * s[None, :, None]), axis=(0, 1)) / (2.0 ** (bw - 1) - 1)  # (out,)
    wgt = jnp.sum(dw ** 2) / 12 * w3.shape[0] * jnp.sum(stats["m2"] / s ** 2)
    return act + wgt


def smooth_scales(den: Denoiser, sampler: Sampler, qcfg: Any, *, n: int = 32, seed: int = BANK_SEEDS["calib"]
                  ) -> dict[int, jax.Array]:
    """SmoothQuant scales ``{l: (Cin,)}`` for every conv / dense layer with a single (..., in, out) kernel whose input
    has Cin channels: per-channel input statistics over FP trajectories of ``n`` calibration images (all steps), and
    α = ``qcfg.smooth_alpha``, or (None) per layer the α of :data:`SMOOTH_ALPHAS` minimising the output-noise model
    :func:`_smooth_noise` at W8A8 (layers where α = 0 wins keep s = 1 and are left out)."""
    layers = bias_correctable(den, need_bias=False)

    def stat(l, a):
        a2 = a.reshape(-1, a.shape[-1])
        return {"lo": a2.min(0), "hi": a2.max(0), "m2": jnp.mean(a2 ** 2, 0)}

    st = fp_layer_stats(den, sampler, stat, layers, n=n, seed=seed)
    alphas = SMOOTH_ALPHAS if qcfg.smooth_alpha is None else (qcfg.smooth_alpha,)
    out = {}
    for l in layers:
        if st[l]["lo"].shape[-1] != den.layers[l].weight_shape[-2]:
            continue
        node = layer_params(den.params, den.layers[l])
        w = jnp.asarray(node["kernel"], jnp.float32)
        stats = {"lo": st[l]["lo"].min(0), "hi": st[l]["hi"].max(0), "m2": st[l]["m2"].mean(0)}
        amax = jnp.maximum(-stats["lo"], stats["hi"])
        cands = [smooth_factors(amax, w, a) for a in alphas]
        noise = [float(_smooth_noise(stats, w, s, 8, 8)) for s in cands]
        best = int(np.argmin(noise))
        if alphas[best] != 0:
            out[l] = cands[best]
    return out
