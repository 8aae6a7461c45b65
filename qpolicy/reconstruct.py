"""Learned weight rounding (AdaRound, Nagel et al. 2020; per-layer output reconstruction as in BRECQ's layer mode),
per bit choice, so bits stay traced data: the engine gathers the reconstructed weights of the chosen bits.

For a layer y = X·W (conv: over k×k×Cin patches of its input), the weight grid (scale per output channel, range
from the clipping search, one grid per shortcut-split slice, SmoothQuant's s·W basis) is kept and only the rounding
direction is learned: W_q = s·clip(⌊W/s⌋ + h(V), qmin, qmax), h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1), minimising

    E||X·(W_q − W)||² / E||X·(W_near − W)||²  +  λ · mean(1 − |2h − 1|^β)      (β annealed 20 → 2)

with Adam (optax) from V such that h = the fractional part (nearest rounding's starting point), on layer inputs
sampled from FP trajectories of the calibration images at every sampler step. The result is hard rounding
(h = 1[V ≥ 0]: every weight stays on its floor or ceiling) and is kept only where it lowers the calibration output
error below nearest rounding's.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .banks import BANK_SEEDS
from .layers import layer_params
from .ptq import fp_layer_stats

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)


def rect_sigmoid(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(rest: jax.Array) -> jax.Array:
    """V with rect_sigmoid(V) = rest (the fractional part of W/s)."""
    r = jnp.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return jnp.log(r / (1 - r))


@functools.partial(jax.jit, static_argnames=("iters",))
def adaround(x: jax.Array, w: jax.Array, scale: jax.Array, qmin: jax.Array, qmax: jax.Array, *, iters: int = 300,
             lr: float = 3e-2, reg: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Learned rounding of a (D, Cout) matmul weight ``w`` on the grid ``scale`` (broadcast to w) with integer bounds
    [qmin, qmax], for input rows ``x`` (P, D). Returns (W_q (D, Cout) on the grid, output MSE of W_q, output MSE of
    nearest rounding) on ``x``; each entry of W_q is s·clip(⌊w/s⌋ or ⌈w/s⌉)."""
    wn = w / scale
    base = jnp.floor(wn)
    v0 = _init_v(wn - base)
    grid = lambda h: jnp.clip(base + h, qmin, qmax) * scale  # noqa: E731
    err = lambda wq: jnp.mean(jnp.sum((x @ (wq - w)) ** 2, -1))  # noqa: E731
    near = jnp.clip(jnp.round(wn), qmin, qmax) * scale
    e_near = err(near)
    opt = optax.adam(lr)

    def loss(v, beta):  # reconstruction relative to nearest rounding's + the mean rounding regulariser
        h = rect_sigmoid(v)
        return err(grid(h)) / jnp.maximum(e_near, 1e-30) + reg * jnp.mean(1 - jnp.abs(2 * h - 1) ** beta)

    def body(k, carry):
        v, st = carry
        frac = jnp.clip((k - 0.2 * iters) / (0.8 * iters), 0.0, 1.0)
        beta = jnp.where(k < 0.2 * iters, 20.0, 20.0 + (2.0 - 20.0) * frac)
        g = jax.grad(loss)(v, beta)
        upd, st = opt.update(g, st, v)
        return optax.apply_updates(v, upd), st

    v, _ = jax.lax.fori_loop(0, iters, body, (v0, opt.init(v0)))
    wq = grid((v >= 0).astype(w.dtype))
    return wq, err(wq), e_near


def conv_rows(a: jax.Array, ksize: tuple[int, ...]) -> jax.Array:
    """Every k×k input patch of a (B, H, W, C) conv input as rows (B·H'·W', k·k·C) ordered like a (kh, kw, C, out)
    kernel reshaped to (kh·kw·C, out) ('VALID' patches: the interior positions)."""
    p = jax.lax.conv_general_dilated_patches(a, ksize, (1,) * len(ksize), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    c = a.shape[-1]
    p = p.reshape(*p.shape[:-1], c, int(np.prod(ksize)))  # patches come (C, kh·kw)-ordered
    return jnp.swapaxes(p, -1, -2).reshape(-1, int(np.prod(ksize)) * c)


def layer_rows(den: Any, sampler: Any, layers: list[int], *, n: int, rows: int = 1024,
               seed: int = BANK_SEEDS["calib"]) -> dict[int, jax.Array]:
    """``{l: (≈rows, D) calibration input rows}`` of each conv / dense layer: at every sampler step, ``rows / S`` rows
    drawn (fixed key) from the patch rows (conv) or feature rows (dense) of the first two of ``n`` calibration images'
    FP inputs."""
    per_step = max(1, rows // sampler.num_steps)

    def stat(l, a):
        ws = den.layers[l].weight_shape
        r = conv_rows(a[:2], ws[:-2]) if len(ws) > 2 else a[:2].reshape(-1, a.shape[-1])
        idx = jax.random.randint(jax.random.key(l), (per_step,), 0, r.shape[0])
        return r[idx]

    st = fp_layer_stats(den, sampler, stat, layers, n=n, seed=seed)
    return {l: v.reshape(-1, v.shape[-1]) for l, v in st.items()}


@jax.jit
def gptq(gram: jax.Array, w: jax.Array, scale: jax.Array, qmin: jax.Array, qmax: jax.Array, damp: float = 0.01
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GPTQ (Frantar et al. 2023) on a fixed grid: the rows of a (D, Cout) matmul weight ``w`` are rounded one at a
    time to the grid ``scale`` (broadcast to w) with integer bounds [qmin, qmax], and each row's rounding error is
    compensated on the rows not yet rounded through the inverse of H = ``gram`` + damp·mean(diag)·I (``gram``: the
    input rows' second moment, :func:`layer_grams`). Returns (W_q on the grid, output error of W_q, output error of
    nearest rounding), errors as ΔWᵀ·gram·ΔW summed over output channels."""
    d = w.shape[0]
    diag = jnp.diag(gram)
    h = gram + (damp * jnp.maximum(jnp.mean(diag), 1e-12)) * jnp.eye(d, dtype=gram.dtype)
    u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T  # upper factor of H⁻¹ (GPTQ's Hinv)
    q = lambda v, s: jnp.clip(jnp.round(v / s), qmin, qmax) * s  # noqa: E731
    later = jnp.arange(d)

    def body(k, carry):
        wk, out = carry
        row = q(wk[k], scale[k])
        e = (wk[k] - row) / u[k, k]
        wk = wk - jnp.where((later > k)[:, None], jnp.outer(u[k], e), 0.0)
        return wk, out.at[k].set(row)

    _, wq = jax.lax.fori_loop(0, d, body, (w, jnp.zeros_like(w)))
    err = lambda v: jnp.sum((gram @ (v - w)) * (v - w))  # noqa: E731
    return wq, err(wq), err(q(w, scale))


def reconstruct_weights(den: Any, sampler: Any, layers: list[int], grid_of: Callable[[int, jax.Array], Any],
                        choices: tuple[int, ...], *, n: int, iters: int = 300, rows: int = 1024,
                        method: str = "adaround", center: bool = True) -> dict[int, jax.Array]:
    """``{l: (len(choices), *kernel shape)}`` reconstructed weights of each layer at each bit choice: AdaRound on
    sampled calibration rows (``method="adaround"``) or GPTQ on the calibration inputs' second moments (``"gptq"``,
    centred per step with ``center``). ``grid_of(l, bits)`` returns (scale, qmin, qmax): the layer quantizer's step per
    kernel entry (kernel shape, in the kernel's own basis: SmoothQuant's step on s·W divided by s) and integer bounds.
    Where the reconstruction does not beat nearest rounding on the calibration data, nearest rounding is kept."""
    if method == "gptq":
        xs = layer_grams(den, sampler, layers, n=n, center=center)
    else:
        xs = layer_rows(den, sampler, layers, n=n, rows=rows)
    out = {}
    for l in layers:
        w = jnp.asarray(layer_params(den.params, den.layers[l])["kernel"], jnp.float32)
        w2 = w.reshape(-1, w.shape[-1])
        per = []
        for b in choices:
            scale, qmin, qmax = grid_of(l, jnp.int32(b))
            s2 = jnp.broadcast_to(scale, w.shape).reshape(w2.shape)
            if method == "gptq":
                wq, e_ada, e_near = gptq(xs[l], w2, s2, qmin, qmax)
            else:
                wq, e_ada, e_near = adaround(xs[l], w2, s2, qmin, qmax, iters=iters)
            if not float(e_ada) < float(e_near):
                wq = jnp.clip(jnp.round(w2 / s2), qmin, qmax) * s2
            per.append(wq.reshape(w.shape))
        out[l] = jnp.stack(per)
    return out


# ----------------------------------------------------------------------------------------------- output-aware clipping
def layer_grams(den: Any, sampler: Any, layers: list[int], *, n: int, center: bool, seed: int = BANK_SEEDS["calib"],
                budget: int = 1 << 25) -> dict[int, jax.Array]:
    """``{l: (D, D) second moment E[x xᵀ] of layer l's input rows}`` over every position of ``n`` calibration images'
    FP inputs at every sampler step (rows: k×k patches for a conv, feature vectors for a dense layer), centred per step
    (``center``: the covariance, what is left once a per-step bias absorbs the mean), steps weighted equally. Layers
    run in groups of about ``budget`` Gram entries (one FP pass each)."""
    def stat(l, a):
        ws = den.layers[l].weight_shape
        r = conv_rows(a, ws[:-2]) if len(ws) > 2 else a.reshape(-1, a.shape[-1])
        if center:  # rows minus their mean (not E[xxᵀ] − mmᵀ, which cancels badly for near-constant inputs)
            r = r - jnp.mean(r, 0)
        return r.T @ r / r.shape[0]

    out: dict[int, jax.Array] = {}
    group: list[int] = []
    size = lambda l: int(np.prod(den.layers[l].weight_shape[:-1])) ** 2 * sampler.num_steps  # noqa: E731
    for l in sorted(layers, key=size) + [None]:
        if group and (l is None or sum(map(size, group)) + size(l) > budget):
            st = fp_layer_stats(den, sampler, stat, group, n=n, seed=seed)
            out.update({k: v.mean(0) for k, v in st.items()})
            group = []
        if l is not None:
            group.append(l)
    return out


def output_clip_ratios(gram: jax.Array, dw_of: Callable[[list[jax.Array], jax.Array], jax.Array],
                       init: list[jax.Array], grid: tuple[float, ...], bits: list[int], *, sweeps: int = 2
                       ) -> list[jax.Array]:
    """Output-aware clipping search of one layer: for each weight bit choice in ``bits``, the clipping ratios (one per
    input-channel slice, each in the weight scale's shape: per output channel or per tensor) minimising the layer's
    output error ΔWᵀ·G·ΔW per output channel (G the input rows' second moment, :func:`layer_grams`;
    ``dw_of(ratios, bits)`` the (D, Cout) weight error Q(W) − W under those ratios, jittable in traced bits). Each
    slice's ratio is searched over ``grid`` with the others fixed (coordinate descent from ``init``, ``sweeps`` passes
    when the input is split); a ratio changes only where it lowers the error, so the output error is never above
    ``init``'s (ties, e.g. a zero Gram, keep ``init``). ``init``: per slice, (len(bits), *scale shape) ratios; returns
    the same layout."""
    grid_a = jnp.asarray(grid, jnp.float32)

    def err_of(rs, b):  # output error per scale entry
        d = dw_of(rs, b)
        e = jnp.sum((gram @ d) * d, 0)
        return e.reshape(rs[0].shape) if rs[0].size == e.size else jnp.sum(e).reshape(rs[0].shape)

    @jax.jit
    def search(rs, b):
        err = err_of(rs, b)
        for _ in range(sweeps if len(rs) > 1 else 1):
            for j in range(len(rs)):
                errs = jax.vmap(lambda g: err_of([*rs[:j], jnp.full_like(rs[j], g), *rs[j + 1:]], b))(grid_a)
                e = jnp.min(errs, 0)
                better = e < err * (1 - 1e-6)
                rs = [*rs[:j], jnp.where(better, grid_a[jnp.argmin(errs, 0)], rs[j]), *rs[j + 1:]]
                err = jnp.where(better, e, err)
        return rs

    found = [search([jnp.asarray(r[c], jnp.float32) for r in init], jnp.int32(b)) for c, b in enumerate(bits)]
    return [jnp.stack([f[j] for f in found]) for j in range(len(init))]
