"""Convolutions whose kernels differ per env: a vmap rule that runs them as one batched matrix product.

Each env of a batched env step quantizes the weights at its own bits, so under ``jax.vmap`` over envs every
convolution has a batched kernel. JAX's own batching rule turns that into one grouped convolution with a group
per env (``feature_group_count = n``), a kernel shape cuDNN and the CPU backends handle poorly. :func:`conv` is
``lax.conv_general_dilated`` with another rule for that case (im2col): the input's patches
(``lax.conv_general_dilated_patches``, a convolution with a constant kernel, batched by folding the env axis into
the image batch) contracted with each env's kernel flattened to (C·kh·kw, O), a ``dot_general`` with the env axis
as its batch dimension (a batched GEMM); or "map": one plain convolution per env in a ``lax.map`` loop (each env's
B images against its own kernel; on CPUs, measured 4-6x faster than the grouped convolution). Unbatched, or with a shared kernel, it is ``lax.conv_general_dilated``
itself (same program, same numerics); grouped or transposed-layout convolutions keep JAX's rule.

:func:`conv_interceptor` makes every ``flax.linen.Conv`` (without its own ``conv_general_dilated``) use it inside
``nn.intercept_methods``: the engine installs it with ``QuantEngine(batched_conv="im2col" | "map")``. The rule is forward
only (``custom_vmap`` has no reverse-mode autodiff), which is all a quantized env step needs.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

#: Implementations of a convolution with per-env kernels (QuantEngine.batched_conv).
BATCHED_CONV_IMPLS = ("xla", "im2col", "map")
#: What env.batched_conv accepts: an implementation, or "auto" (:func:`resolve`).
BATCHED_CONV_SETTINGS = ("auto", *BATCHED_CONV_IMPLS)


def resolve(setting: str) -> str:
    """The implementation a setting means on this process's default backend: "auto" is "map" on CPUs (measured
    faster there, benchmarks/results/env_step_profile_cpu_digits16.json) and "xla" elsewhere (GPUs: unmeasured)."""
    if setting not in BATCHED_CONV_SETTINGS:
        raise ValueError(f"batched_conv must be one of {BATCHED_CONV_SETTINGS}, got {setting!r}")
    if setting != "auto":
        return setting
    return "map" if jax.default_backend() == "cpu" else "xla"


def _im2col_ok(lhs_ndim: int, kw: dict) -> tuple[bool, Any]:
    """(whether the im2col rule applies, the ConvDimensionNumbers): one feature group, one batch group."""
    if kw.get("feature_group_count", 1) != 1 or kw.get("batch_group_count", 1) != 1:
        return False, None
    dn = lax.conv_dimension_numbers((1,) * lhs_ndim, (1,) * lhs_ndim, kw.get("dimension_numbers"))
    return dn.out_spec[0] == 0, dn  # the image batch leads the output (NHWC, NCHW, ...)


def _im2col(lhs: jax.Array, rhs: jax.Array, window_strides, padding, kw: dict, dn) -> jax.Array:
    """lhs (n, *lhs_shape) with per-env kernels rhs (n, *rhs_shape) -> (n, *out_shape) by patches x kernel."""
    n = rhs.shape[0]
    lhs_spec, rhs_spec, out_spec = dn  # each: (batch/out-feature dim, feature/in-feature dim, *spatial dims)
    flat = lhs.reshape(n * lhs.shape[1], *lhs.shape[2:])  # the env axis folded into the image batch
    filt = tuple(rhs.shape[1 + d] for d in rhs_spec[2:])
    patches = lax.conv_general_dilated_patches(
        flat, filt, window_strides, padding, lhs_dilation=kw.get("lhs_dilation"),
        rhs_dilation=kw.get("rhs_dilation"), dimension_numbers=kw.get("dimension_numbers"),
        precision=lax.Precision.HIGHEST)  # an exact copy (an identity kernel; no TF32 rounding on GPUs)
    # patches: out layout, feature dim = C_in * prod(filt) in (C_in, *spatial) order
    feat = out_spec[1]
    p = jnp.moveaxis(patches, feat, -1)  # (n*B, *spatial_out, K) in out_spec's batch/spatial order
    p_shape = p.shape
    p = p.reshape(n, -1, p.shape[-1])  # (n, rows, K)
    k = jnp.transpose(rhs, (0, 1 + rhs_spec[1], *(1 + d for d in rhs_spec[2:]), 1 + rhs_spec[0]))
    k = k.reshape(n, -1, rhs.shape[1 + rhs_spec[0]])  # (n, K, O)
    y = lax.dot_general(p, k.astype(p.dtype) if k.dtype != p.dtype else k, (((2,), (1,)), ((0,), (0,))),
                        precision=kw.get("precision"), preferred_element_type=kw.get("preferred_element_type"))
    # y: (n, rows, O) -> the output layout: rows are (batch, *spatial_out) in out order minus the feature dim
    y = y.reshape(n, lhs.shape[1], *p_shape[1:-1], y.shape[-1])
    return jnp.moveaxis(y, -1, 1 + feat)


def conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, *, impl: str = "im2col", **kw: Any) -> jax.Array:
    """``lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)``, batched over per-env kernels by
    ``impl``: "im2col" or "map" (see the module doc)."""
    plain = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding, **kw)

    @jax.custom_batching.custom_vmap
    def f(l, r):
        return plain(l, r)

    @f.def_vmap
    def rule(axis_size, in_batched, l, r):
        lb, rb = in_batched
        ok, dn = _im2col_ok(l.ndim - lb, kw)
        if not rb or not ok:
            return jax.vmap(plain, in_axes=(0 if lb else None, 0 if rb else None))(l, r), True
        if not lb:
            l = jnp.broadcast_to(l, (axis_size, *l.shape))
        if impl == "map":
            return lax.map(lambda lr: plain(*lr), (l, r)), True
        return _im2col(l, r, window_strides, padding, kw, dn), True

    return f(lhs, rhs)


def conv_interceptor(impl: str):
    """An ``nn.intercept_methods`` interceptor: each ``nn.Conv`` call without a custom ``conv_general_dilated`` runs
    with :func:`conv` and ``impl`` (the module instance is the bound clone of this apply; the field is restored
    after the call)."""
    op = functools.partial(conv, impl=impl)

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or type(mod) is not nn.Conv or mod.conv_general_dilated is not None \
                or getattr(mod, "conv_general_dilated_cls", None) is not None:
            return next_fun(*args, **kwargs)
        object.__setattr__(mod, "conv_general_dilated", op)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(mod, "conv_general_dilated", None)
    return interceptor


__all__ = ["BATCHED_CONV_IMPLS", "BATCHED_CONV_SETTINGS", "conv", "conv_interceptor", "resolve"]
