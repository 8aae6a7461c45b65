"""Simulated ("fake") quantization: every quantizer formula lives here, once.

Bitwidths are *data*, not configuration: ``bits`` is a traced integer array
(an int32 scalar, or an array broadcastable against the scale shape, see
below) so one compiled function serves every bitwidth an RL agent picks.
Nothing in this module branches in Python on a traced bit value; the only
Python-level checks on ``bits`` happen when it is a concrete host value.

Conventions
-----------
* ``bits >= 32`` means float passthrough: the output is bit-identical to the
  input (selected with ``jnp.where`` on the final result), and the gradient is
  the identity.  16 is a real 16-bit integer grid.
* Effective integer bits are clamped to ``[BITS_MIN_SYMMETRIC, BITS_MAX_INT]``
  (symmetric) or ``[BITS_MIN_ASYMMETRIC, BITS_MAX_INT]`` (asymmetric) inside
  the traced computation.  ``BITS_MAX_INT = 24`` because float32 holds integer
  codes exactly only up to 2**24.  For *concrete* (non-traced) ``bits`` below
  the minimum, :func:`fake_quant` / :func:`quantize_int` raise ``ValueError``
  instead of clamping; use :func:`validate_bits` to check a value against the
  policy's choice set.
* All arithmetic is float32; the output keeps the input dtype.
* Scales and ranges are returned in the *parameter shape* of the spec:
    - ``"tensor"``:  ``(1,) * x.ndim`` (keepdims over all axes),
    - ``"channel"``: keepdims over every axis except ``spec.axis``,
    - ``"group"``:   keepdims over every axis except ``spec.axis`` and
      ``spec.group_axis``; along ``group_axis`` it has length
      ``x.shape[group_axis] // group_size`` (one entry per group).
  Static ranges passed as ``absmax=`` / ``minmax=`` and array-valued ``bits``
  must broadcast to that parameter shape (for ``"group"``: be a scalar or have
  exactly that ``x.ndim``-dimensional layout).

Uniform grid (``log2=False``)
-----------------------------
``qmin, qmax = qrange(bits, symmetric)``

* symmetric:  ``scale = max(absmax / qmax, SCALE_EPS)``, ``zp = 0``.
* asymmetric: ``lo = min(min, 0)``, ``hi = max(max, 0)`` (zero is always
  exactly representable), ``scale = max((hi - lo) / qmax, SCALE_EPS)``,
  ``zp = clip(round(-lo / scale), qmin, qmax)``.
* ``q = clip(round(x / scale) + zp, qmin, qmax)``; ``x_hat = (q - zp) * scale``.

``round`` is round-half-to-even (``jnp.round``).  Every ``a / d`` above with
``d`` a qmax or scale is evaluated as ``a * (1 / d)`` with the reciprocal
taken once per scale entry (bit-identical across code paths; may differ from
a correctly rounded division by an ulp, which only matters at exact ties).  ``SCALE_EPS`` guards
all-zero tensors: their output is exactly zero, never NaN.

Power-of-two grid (``log2=True``, symmetric only)
-------------------------------------------------
With ``s = max(absmax, SCALE_EPS)`` (the top level; returned as the "scale")
and ``n = 2**(b-1) - 1`` non-zero magnitude levels ``s * 2**-k, k = 0..n-1``::

    e     = round(log2(|x| * (1 / s)))      # -inf for x == 0
    x_hat = 0                               if e < -(n - 1)
          = sign(x) * s * 2**min(e, 0)      otherwise

i.e. magnitudes are rounded to the nearest power-of-two level *in the log
domain*, values above ``s`` clip to ``s``, and values with
``|x| < s * 2**-(n - 1 + 0.5)`` flush to zero.  Integer codes are
``q = sign(x) * (min(e, 0) + n)`` (0 for flushed values), so ``q`` lies in
``qrange(bits, True) = [-n, n]``.

Gradients
---------
* ``ste=True`` (clipped straight-through estimator): the forward value is
  ``x_hat``; d x_hat / d x is 1 where the value was *not clipped* (the rounded
  code ``round(x/scale) + zp`` lies in ``[qmin, qmax]``; for log2: ``e <= 0``,
  flushed-to-zero values count as in range) and 0 where it was clipped.  No
  gradient flows into the scale / static ranges.
* ``ste=False``: JAX's natural gradient (rounding has zero derivative; a
  dynamic scale still receives its natural gradient).

Non-finite inputs
-----------------
:func:`check_finite` raises ``ValueError`` for a concrete host/eager array
containing NaN/inf and is a no-op on tracers.  The quantizers themselves do
not sanitise: inside ``jit`` a NaN propagates to the output element, and a
NaN/inf entering a *dynamic* range makes the scale of its whole reduction
group (tensor / channel / group) non-finite, so that group's outputs are NaN
(for log2, a +/-inf within a static range clips to +/-s).  Passthrough
(``bits >= 32``) returns the input unchanged, NaNs included.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .bits import DEFAULT_BIT_CHOICES, PASSTHROUGH_BITS, check_bits

__all__ = [
    "QuantSpec",
    "WEIGHT_DEFAULT",
    "ACT_DEFAULT",
    "DEFAULT_BIT_CHOICES",
    "PASSTHROUGH_BITS",
    "BITS_MAX_INT",
    "BITS_MIN_SYMMETRIC",
    "BITS_MIN_ASYMMETRIC",
    "SCALE_EPS",
    "GRANULARITIES",
    "ACT_RANGE_MODES",
    "qrange",
    "effective_bits",
    "compute_scale",
    "range_from",
    "percentile_range",
    "fake_quant",
    "quantize_int",
    "dequantize",
    "check_finite",
    "validate_bits",
]

GRANULARITIES = ("tensor", "channel", "group")
#: Activation ranges: "dynamic" (min/max of each call) or "static" (calibrated per layer and step bucket).
ACT_RANGE_MODES = ("dynamic", "static")
BITS_MAX_INT = 24
BITS_MIN_SYMMETRIC = 2
BITS_MIN_ASYMMETRIC = 1
SCALE_EPS = 1e-30  # a normal float32; keeps scale > 0 for all-zero ranges


# --------------------------------------------------------------------------- #
# Static config
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Static (compile-time, hashable) quantizer family.  Bits are NOT here.

    Attributes:
      symmetric: signed narrow-range grid with zero point 0 (True) or unsigned
        ``[0, 2**b - 1]`` grid with an integer zero point (False).
      granularity: ``"tensor"`` (one scale), ``"channel"`` (one scale per index
        of ``axis``) or ``"group"`` (one scale per index of ``axis`` *and* per
        contiguous block of ``group_size`` elements along ``group_axis``).
      axis: the channel axis that keeps its own scale ("channel"/"group").
        Flax kernels keep the output channel last, hence the default -1.
      group_size: block length along ``group_axis`` for "group"; the length
        of that axis must be divisible by it (``ValueError`` otherwise).
      group_axis: the axis that is split into groups for "group" (default -2:
        the input/contraction axis of a Flax Dense ``(in, out)`` or Conv
        ``(kh, kw, in, out)`` kernel).  Every other axis except ``axis`` is
        reduced over, so a conv kernel gets one scale per (out channel,
        group of ``group_size`` input channels), shared over kh and kw.
        Must differ from ``axis``.
      log2: power-of-two (logarithmic) grid; requires ``symmetric=True``.
      ste: clipped straight-through gradient (see module docstring).
    """

    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = -1
    group_size: int = 32
    log2: bool = False
    ste: bool = True
    group_axis: int = -2

    def __post_init__(self):
        for name in ("symmetric", "log2", "ste"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"QuantSpec.{name} must be a bool, got {v!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity={self.granularity!r} is not one of the "
                f"accepted values {GRANULARITIES}"
            )
        for name in ("axis", "group_axis", "group_size"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"QuantSpec.{name} must be an int, got {v!r}")
        if self.group_size < 1:
            raise ValueError(
                f"QuantSpec.group_size must be >= 1, got {self.group_size}"
            )
        if self.log2 and not self.symmetric:
            raise ValueError(
                "QuantSpec.log2=True requires QuantSpec.symmetric=True "
                "(the power-of-two grid is sign-magnitude)"
            )
        if self.granularity == "group" and self.axis == self.group_axis:
            raise ValueError(
                f"QuantSpec.group_axis ({self.group_axis}) must differ from "
                f"QuantSpec.axis ({self.axis}) for granularity='group'"
            )


WEIGHT_DEFAULT = QuantSpec(symmetric=True, granularity="channel", axis=-1)
ACT_DEFAULT = QuantSpec(symmetric=False, granularity="tensor")


# --------------------------------------------------------------------------- #
# Bits helpers
# --------------------------------------------------------------------------- #
def _is_traced(v) -> bool:
    return isinstance(v, jax.core.Tracer)


def _min_bits(symmetric: bool) -> int:
    return BITS_MIN_SYMMETRIC if symmetric else BITS_MIN_ASYMMETRIC


def _check_concrete_bits(bits, symmetric: bool) -> None:
    """Raise for concrete bits below the family's minimum (traced: clamped)."""
    if _is_traced(bits):
        return
    b = np.asarray(bits)
    if not np.issubdtype(b.dtype, np.integer):
        if not np.all(np.mod(b, 1) == 0):
            raise ValueError(f"bits must be integers, got {b!r}")
    lo = _min_bits(symmetric)
    if b.size and np.min(b) < lo:
        kind = "symmetric" if symmetric else "asymmetric"
        raise ValueError(
            f"bits={b.tolist()} below the minimum {lo} for a {kind} grid"
        )


def effective_bits(bits, symmetric: bool) -> jax.Array:
    """int32 bits clamped to the computable integer range of the family."""
    b = jnp.asarray(bits).astype(jnp.int32)
    return jnp.clip(b, _min_bits(symmetric), BITS_MAX_INT)


def qrange(bits, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Integer grid bounds ``(qmin, qmax)`` (int32) for ``effective_bits``.

    symmetric: ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (narrow range);
    asymmetric: ``[0, 2**b - 1]``.
    """
    b = effective_bits(bits, symmetric)
    one = jnp.int32(1)
    if symmetric:
        qmax = jnp.left_shift(one, b - 1) - 1
        return -qmax, qmax
    qmax = jnp.left_shift(one, b) - 1
    return jnp.zeros_like(qmax), qmax


def validate_bits(bits, choices: Sequence[int] = DEFAULT_BIT_CHOICES):
    """Raise ``ValueError`` if a concrete ``bits`` value is not in ``choices`` (the rule of
    :func:`qpolicy.bits.check_bits`). A no-op (returns ``bits``) for traced values.
    """
    if not _is_traced(bits):
        check_bits(bits, choices, field="bits")
    return bits


def check_finite(x, name: str = "x"):
    """Raise ``ValueError`` if a concrete array holds NaN/inf; no-op on tracers."""
    if _is_traced(x):
        return x
    a = np.asarray(x)
    if not np.all(np.isfinite(a)):
        n_nan = int(np.isnan(a).sum())
        n_inf = int(np.isinf(a).sum())
        raise ValueError(
            f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf)"
        )
    return x


# --------------------------------------------------------------------------- #
# Layout (granularity) helpers
# --------------------------------------------------------------------------- #
def _norm_axis(axis: int, ndim: int, field: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"QuantSpec.{field}={axis} is out of range for an array with "
            f"ndim={ndim}"
        )
    return axis % ndim


@dataclasses.dataclass(frozen=True)
class _Layout:
    shape: tuple
    work_shape: tuple
    reduce_axes: tuple
    split_axis: int | None  # position of the size-group_size axis in work layout

    def to_work(self, x):
        return x.reshape(self.work_shape)

    def from_work(self, xw):
        return xw.reshape(self.shape)

    def param_to_work(self, p, what: str):
        p = jnp.asarray(p)
        if self.split_axis is None or p.ndim == 0:
            return p
        if p.ndim != len(self.shape):
            raise ValueError(
                f"{what} for granularity='group' must be a scalar or have "
                f"ndim={len(self.shape)} (the layout returned by range_from), "
                f"got shape {p.shape}"
            )
        return jnp.expand_dims(p, self.split_axis)

    def param_from_work(self, pw):
        if self.split_axis is None:
            return pw
        return jnp.squeeze(pw, self.split_axis)


def _layout(shape: tuple, spec: QuantSpec) -> _Layout:
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if spec.granularity == "tensor":
        return _Layout(shape, shape, tuple(range(ndim)), None)
    ax = _norm_axis(spec.axis, ndim, "axis")
    if spec.granularity == "channel":
        red = tuple(i for i in range(ndim) if i != ax)
        return _Layout(shape, shape, red, None)
    # group
    gax = _norm_axis(spec.group_axis, ndim, "group_axis")
    if gax == ax:
        raise ValueError(
            f"QuantSpec.group_axis={spec.group_axis} and QuantSpec.axis="
            f"{spec.axis} name the same axis of an ndim={ndim} array"
        )
    length = shape[gax]
    if length % spec.group_size:
        raise ValueError(
            f"QuantSpec.group_size={spec.group_size} does not divide the length "
            f"{length} of group_axis={spec.group_axis} (array shape {shape})"
        )
    work = shape[:gax] + (length // spec.group_size, spec.group_size) + shape[gax + 1:]
    ax_w = ax if ax < gax else ax + 1
    keep = (ax_w, gax)
    red = tuple(i for i in range(ndim + 1) if i not in keep)
    return _Layout(shape, work, red, gax + 1)


def _ranges_work(xw, layout: _Layout, spec: QuantSpec, absmax, minmax):
    """Ranges in work layout (keepdims): absmax (sym) or (lo, hi) (asym)."""
    if spec.symmetric:
        if absmax is None:
            a = jnp.max(jnp.abs(xw), axis=layout.reduce_axes, keepdims=True)
        else:
            a = jnp.abs(layout.param_to_work(absmax, "absmax").astype(jnp.float32))
        return a
    if minmax is None:
        mn = jnp.min(xw, axis=layout.reduce_axes, keepdims=True)
        mx = jnp.max(xw, axis=layout.reduce_axes, keepdims=True)
    else:
        mn, mx = minmax
        mn = layout.param_to_work(mn, "minmax[0]").astype(jnp.float32)
        mx = layout.param_to_work(mx, "minmax[1]").astype(jnp.float32)
    return mn, mx


def _check_static_args(spec: QuantSpec, absmax, minmax):
    if spec.symmetric and minmax is not None:
        raise ValueError("minmax= is for asymmetric specs; use absmax= with symmetric=True")
    if not spec.symmetric and absmax is not None:
        raise ValueError("absmax= is for symmetric specs; use minmax=(min, max) with symmetric=False")


def _recip(d):
    """``1 / d`` on the (small, un-broadcast) parameter array.

    Every division by a scale goes through this explicit reciprocal so the
    formula is the same in every graph: XLA rewrites ``a / broadcast(b)`` into
    ``a * broadcast(1 / b)`` for some fusions and not others, which otherwise
    makes e.g. ``compute_scale`` and ``quantize_int`` differ by an ulp.
    """
    return 1.0 / d


def _scale_zp_work(xw, bits_w, layout, spec, absmax, minmax):
    """float32 (scale, zero_point, qmin, qmax) in work layout."""
    qmin_i, qmax_i = qrange(bits_w, spec.symmetric)
    qmin = qmin_i.astype(jnp.float32)
    qmax = qmax_i.astype(jnp.float32)
    rng = _ranges_work(xw, layout, spec, absmax, minmax)
    if spec.symmetric:
        if spec.log2:
            scale = jnp.maximum(rng, SCALE_EPS)
        else:
            scale = jnp.maximum(rng * _recip(qmax), SCALE_EPS)
        zp = jnp.zeros_like(scale)
    else:
        mn, mx = rng
        lo = jnp.minimum(mn, 0.0)
        hi = jnp.maximum(mx, 0.0)
        scale = jnp.maximum((hi - lo) * _recip(qmax), SCALE_EPS)
        zp = jnp.clip(jnp.round(-lo * _recip(scale)), qmin, qmax)
    # broadcast together so shapes are stable regardless of where bits vary
    scale, zp = jnp.broadcast_arrays(scale, zp + jnp.zeros_like(qmax))
    return scale, zp, qmin, qmax


def _prepare(x, bits, spec, absmax, minmax):
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    _check_static_args(spec, absmax, minmax)
    _check_concrete_bits(bits, spec.symmetric)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    layout = _layout(x.shape, spec)
    xw = layout.to_work(x.astype(jnp.float32))
    bits_w = layout.param_to_work(jnp.asarray(bits), "bits").astype(jnp.int32)
    return x, layout, xw, bits_w


def _quant_core(xw, bits_w, layout, spec, absmax, minmax):
    """Single implementation of the grids, in work layout.

    Returns (x_hat, q_codes_float, scale, zp, in_range_mask).
    """
    scale, zp, qmin, qmax = _scale_zp_work(xw, bits_w, layout, spec, absmax, minmax)
    if spec.log2:
        n = qmax  # number of non-zero magnitude levels
        r = jnp.abs(xw) * _recip(scale)
        r_safe = jnp.where(r == 0, 1.0, r)
        e = jnp.where(r == 0, -jnp.inf, jnp.round(jnp.log2(r_safe)))
        underflow = e < -(n - 1)          # NaN -> False, so NaN propagates
        in_range = ~(e > 0)               # clipped at the top otherwise
        e_c = jnp.clip(jnp.where(jnp.isfinite(e), e, 0.0), -(n - 1), 0.0)
        sgn = jnp.sign(xw)
        x_hat = jnp.where(underflow, 0.0, sgn * jnp.ldexp(scale, e_c.astype(jnp.int32)))
        q = jnp.where(underflow, 0.0, sgn * (e_c + n))
        return x_hat, q, scale, zp, in_range
    v = jnp.round(xw * _recip(scale)) + zp
    q = jnp.clip(v, qmin, qmax)
    in_range = (v >= qmin) & (v <= qmax)
    x_hat = (q - zp) * scale
    return x_hat, q, scale, zp, in_range


@jax.custom_jvp
def _ste(x, x_hat, mask):
    """Forward: x_hat.  Derivative w.r.t. x: mask (nothing to x_hat/mask)."""
    return x_hat


@_ste.defjvp
def _ste_jvp(primals, tangents):
    x, x_hat, mask = primals
    x_dot, _, _ = tangents
    return x_hat, x_dot * mask


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def range_from(x, spec: QuantSpec):
    """Dynamic range of ``x`` reduced over ``spec``'s granularity.

    Returns ``absmax`` (symmetric) or ``(min, max)`` (asymmetric), float32, in
    the parameter shape (see module docstring); feed them back as static
    ``absmax=`` / ``minmax=`` ranges (e.g. after calibration).
    """
    x = jnp.asarray(x)
    layout = _layout(x.shape, spec)
    xw = layout.to_work(x.astype(jnp.float32))
    rng = _ranges_work(xw, layout, spec, None, None)
    if spec.symmetric:
        return layout.param_from_work(rng)
    return tuple(layout.param_from_work(r) for r in rng)


def percentile_range(x, p: float):
    """``(lo, hi)`` = the ``100 - p`` and ``p`` percentiles of all of ``x``'s elements (float32 scalars), exactly
    ``np.percentile(x, [100 - p, p])`` (linear interpolation between order statistics), from the top
    ``k = N - floor((N - 1) · p / 100)`` elements of each tail (``lax.top_k``: no full sort). ``p`` in [50, 100];
    a clipped activation range (percentile calibration) that ignores the rarest outliers."""
    if not 50.0 <= float(p) <= 100.0:
        raise ValueError(f"act_percentile must be in [50, 100], got {p!r}")
    v = jnp.ravel(jnp.asarray(x, jnp.float32))
    n = v.shape[0]
    h = (n - 1) * float(p) / 100.0
    j = int(np.floor(h))
    frac = jnp.float32(h - j)
    k = min(n - j, n)

    def upper(u):  # ascending order statistics j and j + 1 of u = the descending ones n-1-j and n-2-j
        top = jax.lax.top_k(u, k)[0]
        a = top[n - 1 - j]
        b = top[max(n - 2 - j, 0)]
        return a + frac * (b - a)

    return -upper(-v), upper(v)


def compute_scale(x, bits, spec: QuantSpec, *, absmax=None, minmax=None):
    """``(scale float32, zero_point int32)`` in the parameter shape.

    Ranges are dynamic (from ``x``) unless static ``absmax`` (symmetric) or
    ``minmax=(min, max)`` (asymmetric) is given.  ``scale > 0`` always.  For
    ``log2`` specs the scale is the top level ``s`` and ``zero_point`` is 0.
    """
    x, layout, xw, bits_w = _prepare(x, bits, spec, absmax, minmax)
    scale, zp, _, _ = _scale_zp_work(xw, bits_w, layout, spec, absmax, minmax)
    return layout.param_from_work(scale), layout.param_from_work(zp).astype(jnp.int32)


def fake_quant(x, bits, spec: QuantSpec = ACT_DEFAULT, *, absmax=None, minmax=None):
    """Quantize-dequantize ``x`` on the grid of ``spec`` with traced ``bits``.

    Same shape and dtype as ``x``.  ``bits >= 32`` returns ``x`` exactly.
    Jit-compatible with ``bits`` as a runtime argument (no recompilation when
    its value changes); ``spec`` must be static.
    """
    x, layout, xw, bits_w = _prepare(x, bits, spec, absmax, minmax)
    x_hat, _, _, _, in_range = _quant_core(xw, bits_w, layout, spec, absmax, minmax)
    if spec.ste:
        mask = jax.lax.stop_gradient(in_range.astype(jnp.float32))
        y = _ste(xw, jax.lax.stop_gradient(x_hat), mask)
    else:
        y = x_hat
    y = layout.from_work(jnp.broadcast_to(y, xw.shape)).astype(x.dtype)
    passthrough = layout.from_work(
        jnp.broadcast_to(bits_w >= PASSTHROUGH_BITS, xw.shape)
    )
    return jnp.where(passthrough, x, y)


def quantize_int(x, bits, spec: QuantSpec = ACT_DEFAULT, *, absmax=None, minmax=None):
    """Integer codes ``(q int32 shaped like x, scale, zero_point)``.

    ``dequantize(q, scale, zero_point, spec)`` reproduces ``fake_quant`` (for
    ``bits < 32``).  Uniform: ``q`` in ``qrange(bits, spec.symmetric)``.  log2:
    signed level codes ``sign(x) * (min(e, 0) + n)`` in ``[-n, n]``.  There are
    no codes for passthrough: concrete ``bits >= 32`` raises ``ValueError``;
    traced ones yield the ``BITS_MAX_INT``-bit grid.
    """
    if not _is_traced(bits) and np.any(np.asarray(bits) >= PASSTHROUGH_BITS):
        raise ValueError(
            f"bits >= {PASSTHROUGH_BITS} is float passthrough and has no integer codes"
        )
    x, layout, xw, bits_w = _prepare(x, bits, spec, absmax, minmax)
    _, q, scale, zp, _ = _quant_core(xw, bits_w, layout, spec, absmax, minmax)
    q = layout.from_work(jnp.broadcast_to(q, xw.shape)).astype(jnp.int32)
    return q, layout.param_from_work(scale), layout.param_from_work(zp).astype(jnp.int32)


def dequantize(q, scale, zero_point, spec: QuantSpec, bits=None):
    """Map integer codes from :func:`quantize_int` back to float32.

    ``bits`` is only needed for ``log2`` specs (the level count ``n``).
    """
    q = jnp.asarray(q)
    layout = _layout(q.shape, spec)
    qw = layout.to_work(q).astype(jnp.float32)
    s = layout.param_to_work(jnp.asarray(scale, jnp.float32), "scale")
    if spec.log2:
        if bits is None:
            raise ValueError("dequantize needs bits= for log2 specs")
        _, n = qrange(layout.param_to_work(jnp.asarray(bits), "bits"), True)
        mag = jnp.abs(qw)
        out = jnp.where(
            qw == 0, 0.0,
            jnp.sign(qw) * jnp.ldexp(s, (mag - n.astype(jnp.float32)).astype(jnp.int32)),
        )
    else:
        zp = layout.param_to_work(jnp.asarray(zero_point, jnp.float32), "zero_point")
        out = (qw - zp) * s
    return layout.from_work(jnp.broadcast_to(out, qw.shape))
