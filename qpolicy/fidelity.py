"""Real integer execution of the quantized sampler, checked against the fake-quant simulation.

For every conv / dense layer whose weight and activation bits are <= 8 the integer path computes what an int8
kernel computes: int8 operands (weights: symmetric codes; activations: unsigned codes shifted by 128 into int8),
int32 accumulation (``lax.conv_general_dilated`` / ``lax.dot_general`` with ``preferred_element_type=int32``, run
through the layer's own Flax module so padding, strides and dilation are the module's), then requantization to
float with the product of the scales and the (bias-corrected) float bias:

    y = Σ_parts s_x · s_w[c] · (conv(q_x − 128, q_w) − conv(zp − 128, q_w)) + b

(one part per concatenated input with shortcut splitting; the second convolution removes the zero point exactly,
padding included). :func:`check` compares that with the simulation layer by layer at every sampler step, in units
of the output's own quantization step at the layer's activation bits (``max_lsb``), and end to end (the whole
sampler run on the integer path vs on the simulation).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .banks import ReferenceBank
from .engine import QuantEngine, relative_error
from .layers import layer_params, path_tuple
from .quant import quantize_int, range_from

INT_KINDS = ("conv", "dense")


def _int8_op(op, out=jnp.int32):
    """``op`` (lax.conv_general_dilated / lax.dot_general) on int8 operands with int32 accumulation. Flax promotes the
    module's inputs to float first; they hold small exact integers, so the cast back to int8 is exact. ``out``: the
    result type asked of the kernel (cuDNN's int8 convolutions accumulate in int32 and return float32)."""
    def f(lhs, rhs, *a, **k):
        k.pop("preferred_element_type", None)
        return op(lhs.astype(jnp.int8), rhs.astype(jnp.int8), *a, preferred_element_type=out, **k)
    return f


def int8_out(conv: bool):
    """The result type asked of an int8 x int8 kernel: int32 (the accumulator) except XLA's GPU convolutions, which
    cuDNN runs as int8 x int8 -> (int32 accumulation) float32."""
    return jnp.int32 if not conv or jax.default_backend() == "cpu" else jnp.float32


def with_op(module: nn.Module, wrap, **overrides: Any) -> nn.Module:
    """A parentless copy of a Conv / Dense / DenseGeneral whose contraction op (``lax.conv_general_dilated`` /
    ``lax.dot_general``) is ``wrap(op)``, so the module's own padding, strides, dilation and dimension numbers reach
    the replacement (used by the integer path here and the latency measurement in :mod:`qpolicy.latency`)."""
    if isinstance(module, nn.Conv):
        return module.clone(parent=None, conv_general_dilated=wrap(lax.conv_general_dilated), **overrides)
    return module.clone(parent=None, dot_general=wrap(lax.dot_general), **overrides)


def _int_module(module: nn.Module) -> nn.Module:
    """A parentless, bias-free copy of a Conv / Dense whose contraction runs on int8 operands into int32."""
    conv = isinstance(module, nn.Conv)
    return with_op(module, lambda op: _int8_op(op, int8_out(conv)), use_bias=False)


def int_accumulate(module: nn.Module, q_in: jax.Array, zp: jax.Array, q_w: jax.Array) -> jax.Array:
    """int32 conv/dot of (q_in − zp) with q_w, from int8 operands only: (q_in − 128) and (zp − 128) (q_in unsigned
    codes, zp (B, 1, ...)); padding is zero in both terms, so their difference is exact."""
    m = _int_module(module)
    params = {"params": {"kernel": q_w}}
    shifted = q_in - 128
    offset = jnp.broadcast_to(zp - 128, q_in.shape)
    return (m.apply(params, shifted) - m.apply(params, offset)).astype(jnp.int32)


def integer_layer(engine: QuantEngine, l: int, module: nn.Module, x: jax.Array, bits_w: jax.Array,
                  bits_a: jax.Array, i: jax.Array = 0) -> jax.Array:
    """Layer l's output on the integer path for float input x (B, ..., Cin) (before activation quantization) at
    sampler step i: the engine's activation ranges (clipping) and weight codes (clipping search, SmoothQuant's s·W
    with the input divided by s, learned rounding where reconstructed)."""
    spec_a = engine.qcfg.a_spec
    w = jnp.asarray(engine_weight(engine, l), jnp.float32)
    sizes = engine.weight_parts(l, w) or (w.shape[-2],)
    splits = np.cumsum(sizes)[:-1].tolist()
    if l in engine.smooth:
        x = x / engine.smooth_scale(l, bits_w)
    w_codes = engine.smoothed(l, engine.quantize_weight(l, w, bits_w), bits_w)  # on the grid: exact codes, rounded
    xs = jnp.split(x, splits, axis=-1) if len(sizes) > 1 and x.shape[-1] == sum(sizes) else [x]
    w_s = engine.smoothed(l, w, bits_w)
    ws = jnp.split(w_s, splits, axis=-2) if len(xs) > 1 else [w_s]
    wq = jnp.split(w_codes, splits, axis=-2) if len(xs) > 1 else [w_codes]
    y = 0.0
    for j, (xp, wp, wqp) in enumerate(zip(xs, ws, wq)):
        q_x, s_x, zp = jax.vmap(lambda v: quantize_int(v, bits_a, spec_a,  # per image, like the simulation
                                                       minmax=engine.act_range(l, j, i, bits_a, v)))(xp)
        absmax = engine.weight_absmax(l, "kernel", j, wp, bits_w)
        _, s_w, _ = quantize_int(wp, bits_w, engine.qcfg.w_spec, absmax=absmax)
        q_w = jnp.round(wqp / s_w).astype(jnp.int32)
        acc = int_accumulate(module, q_x, zp.reshape((-1,) + (1,) * (xp.ndim - 1)), q_w)
        y = y + acc.astype(jnp.float32) * s_x.reshape((-1,) + (1,) * (acc.ndim - 1)) * s_w.reshape(-1)
    bias = module.variables["params"].get("bias")
    return y + bias if bias is not None else y


def engine_weight(engine: QuantEngine, l: int) -> Any:
    node = layer_params(engine.den.params, engine.den.layers[l])
    return node["kernel"]


def eligible(engine: QuantEngine) -> list[int]:
    """Layers the integer path can run: conv / dense with a single kernel (grouped convs are left to the
    simulation at call time)."""
    return [lay.index for lay in engine.den.layers if lay.kind in INT_KINDS and lay.weight_names == ("kernel",)]


def _interceptor(engine: QuantEngine, i: jax.Array, bw: jax.Array, ba: jax.Array, record: dict, use_int: bool):
    """Runs each eligible layer both ways at step i (traced bits): records (max |y_int − y_sim| / output step,
    max |y_int − y_sim|) where both bits are <= 8 (0 elsewhere), and returns y_int there (use_int) or y_sim."""
    index = {path_tuple(l.path): l.index for l in engine.den.layers}
    ok = set(eligible(engine))
    act = engine.act_quant_fn(i, ba, bw)

    def interceptor(next_fun, args, kwargs, context):
        l = index.get(tuple(context.module.scope.path)) if context.method_name == "__call__" else None
        if l is None or not args:
            return next_fun(*args, **kwargs)
        x = args[0]
        y_sim = next_fun(act(l, x), *args[1:], **kwargs)
        mod = context.module
        if l not in ok or not isinstance(mod, (nn.Conv, nn.Dense)) or getattr(mod, "feature_group_count", 1) != 1:
            return y_sim
        on = (bw[l] <= 8) & (ba[l] <= 8)
        y_int = integer_layer(engine, l, mod, x, jnp.minimum(bw[l], 8), jnp.minimum(ba[l], 8), i)
        lo, hi = jax.vmap(lambda v: range_from(v, engine.qcfg.a_spec))(y_sim)
        step = (hi - lo).reshape(-1) / (2.0 ** ba[l].astype(jnp.float32) - 1)  # output step per image
        dev = jnp.abs(y_int - y_sim).reshape(y_sim.shape[0], -1).max(1)
        record[l] = jnp.where(on, jnp.stack([jnp.max(dev / jnp.maximum(step, 1e-30)), jnp.max(dev), 1.0]), 0.0)
        return jnp.where(on, y_int, y_sim) if use_int else y_sim

    return interceptor


def run_sampler(engine: QuantEngine, bank: ReferenceBank, bits_w: np.ndarray, bits_a: np.ndarray, *,
                use_int: bool) -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """Final samples (N, H, W, C) of the sampler on the integer path (use_int) or the simulation, with the per-step,
    per-layer deviations of the integer path (S, L, 2) = (max_lsb, max_abs) and where it actually ran (S, L) bool.
    One compiled step serves every step and schedule (bits are traced)."""
    from .diffusion import sampler_step

    L = engine.num_layers

    @jax.jit
    def step(x, i, bw, ba, keys):
        rec: dict[int, jax.Array] = {}
        t = jnp.full((x.shape[0],), engine.sampler.timesteps[i], jnp.int32)
        with nn.intercept_methods(_interceptor(engine, i, bw, ba, rec, use_int)):
            eps = engine.den.apply(engine.quantize_params(bw, i), x, t, keys)
        stats = jnp.stack([rec.get(l, jnp.zeros(3)) for l in range(L)])
        return sampler_step(engine.sampler, x, eps, i, keys), stats

    x = engine.initial(bank.keys)
    stats = []
    for i in range(engine.num_steps):
        x, st = step(x, jnp.int32(i), jnp.asarray(bits_w[i], jnp.int32), jnp.asarray(bits_a[i], jnp.int32),
                     bank.keys)
        stats.append(np.asarray(st))
    stats = np.stack(stats)
    return x, stats[..., :2], stats[..., 2] > 0  # (S, L, 2) deviations, (S, L) where the integer path ran


def check(engine: QuantEngine, bank: ReferenceBank, bits_w: Any, bits_a: Any) -> dict[str, Any]:
    """Integer path vs simulation for a (S, L) schedule on ``bank``'s images: per-layer max deviation in output
    quantization steps (``max_lsb``) and absolute, the worst layer, and the end-to-end final errors."""
    spec, q = engine.qcfg.a_spec, engine.qcfg
    if q.act_ranges != "dynamic" or spec.symmetric or spec.granularity != "tensor":
        raise ValueError("the integer path mirrors dynamic, asymmetric, per-tensor activation quantizers (the default "
                         f"activation spec); got act_ranges={q.act_ranges!r}, a_spec={q.a_spec}")
    bw, ba = np.asarray(bits_w, np.int64), np.asarray(bits_a, np.int64)
    x_int, stats, ran = run_sampler(engine, bank, bw, ba, use_int=True)
    x_sim, _, _ = run_sampler(engine, bank, bw, ba, use_int=False)
    ref = bank.traj[-1]
    layers = []
    for l in np.flatnonzero(ran.any(0)):
        layers.append({"index": int(l), "path": engine.den.layers[l].path, "kind": engine.den.layers[l].kind,
                       "max_lsb": float(stats[:, l, 0].max()), "max_abs": float(stats[:, l, 1].max()),
                       "steps": int(ran[:, l].sum())})
    worst = max(layers, key=lambda r: r["max_lsb"]) if layers else None
    return {"layers_int": len(layers), "layers_total": engine.num_layers,
            "max_lsb": worst["max_lsb"] if worst else None, "worst_layer": worst["path"] if worst else None,
            "final_error_int_vs_sim": float(relative_error(x_int, x_sim).mean()),
            "final_error_int_vs_fp": float(relative_error(x_int, ref).mean()),
            "final_error_sim_vs_fp": float(relative_error(x_sim, ref).mean()),
            "n": bank.size, "steps": engine.num_steps, "layers": layers}


__all__ = ["check", "eligible", "int8_out", "integer_layer", "run_sampler", "with_op"]
