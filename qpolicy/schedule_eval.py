"""Schedules run over reference banks: per-step errors, image groups under their own schedules, summaries.

Errors follow DESIGN (see :mod:`qpolicy.engine`, which re-exports every public name here): e_i =
||x_hat_i - x_i||^2 / ||x_i||^2 per image after step i; ``final_error`` is e at the last step, ``traj_error`` the
mean of e over steps.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .banks import ReferenceBank
from .bits import check_bits
from .config import is_int
from .cost import CostModel

if TYPE_CHECKING:
    from .engine import QuantEngine


def relative_error(x_hat: jax.Array, x: jax.Array) -> jax.Array:
    """||x_hat - x||^2 / ||x||^2 per image over the trailing (H, W, C) axes."""
    axes = tuple(range(x.ndim - 3, x.ndim))
    return jnp.sum((x_hat - x) ** 2, axes) / jnp.maximum(jnp.sum(x**2, axes), 1e-12)


def schedule_errors(engine: QuantEngine, keys: jax.Array, ref_traj: jax.Array, bits_w: jax.Array,
                    bits_a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-step errors (S, B) of the quantized run vs ``ref_traj`` (S+1, B, ...) and the final samples."""
    traj = engine.trajectory(keys, bits_w, bits_a)
    return relative_error(traj[1:], ref_traj[1:]), traj[-1]


def auto_chunk(chunk: int | None = None) -> int:
    """Schedules (or image groups) per vmapped call: ``chunk`` if given, else 1 on CPU (a vmap over per-schedule
    weights turns every conv into a grouped conv there, several times slower than a loop) and 16 on accelerators."""
    if chunk is not None:
        if not is_int(chunk) or int(chunk) < 1:
            raise ValueError(f"chunk must be an integer >= 1 (schedules per vmapped call) or None (auto), "
                             f"got {chunk!r}")
        return int(chunk)
    return 1 if jax.default_backend() == "cpu" else 16


@functools.lru_cache(maxsize=16)
def _grouped_errors_fn(engine: QuantEngine):
    return jax.jit(jax.vmap(engine.errors_fn, in_axes=(0, 1, 0, 0)))


def grouped_errors(engine: QuantEngine, bank: ReferenceBank, idx: np.ndarray, bits_w: np.ndarray,
                   bits_a: np.ndarray, owners: Sequence[int] | None = None, *, chunk: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each group of images under its own schedule: group g (bank indices ``idx[g]``, idx (G, B)) runs the
    (S, L) bits of group ``owners[g]`` (default g) from ``bits_w``/``bits_a`` (G, S, L).

    Returns per-step errors (S, G*B) and final samples (G*B, H, W, C), images in ``idx`` order. Groups run in
    vmapped chunks on accelerators and one by one on CPU (:func:`auto_chunk`); bits are traced: one compile."""
    idx = np.asarray(idx)
    G, B = idx.shape
    owners = np.arange(G) if owners is None else np.asarray(owners)
    bw = np.asarray(bits_w, np.int32)[owners]
    ba = np.asarray(bits_a, np.int32)[owners]
    chunk = min(auto_chunk(chunk), G)
    errs, samples = [], []
    if chunk == 1:
        for g in range(G):
            e, x = engine.errors_fn(bank.keys[idx[g]], bank.traj[:, idx[g]], jnp.asarray(bw[g]), jnp.asarray(ba[g]))
            errs.append(np.asarray(e))
            samples.append(np.asarray(x))
        return np.concatenate(errs, axis=1), np.concatenate(samples)
    fn = _grouped_errors_fn(engine)
    for s in range(0, G, chunk):
        sel = np.arange(s, s + chunk).clip(max=G - 1)  # the last chunk repeats its last group: one compiled shape
        m = min(chunk, G - s)
        e, x = fn(bank.keys[idx[sel]], bank.traj[:, idx[sel]], jnp.asarray(bw[sel]), jnp.asarray(ba[sel]))
        errs.append(np.asarray(e)[:m].transpose(1, 0, 2).reshape(engine.num_steps, m * B))  # (c, S, B) -> (S, c*B)
        samples.append(np.asarray(x)[:m].reshape(m * B, *x.shape[2:]))
    return np.concatenate(errs, axis=1), np.concatenate(samples)


def evaluate_schedule(engine: QuantEngine, bank: ReferenceBank, bits_w: Any, bits_a: Any, *,
                      batch_size: int = 256, with_fd: bool = False, cost: CostModel | None = None
                      ) -> dict[str, Any]:
    """Run a static (S, L) schedule on every image of ``bank``.

    Returns cost summary (see CostModel.summary) plus per_step_error (S,), traj_error, final_error
    (means over images), errors (S, N) numpy (per step and image), samples (N, H, W, C) numpy, and fd (+ fd_fp:
    the FP samples' fd) if with_fd."""
    S, L = engine.num_steps, engine.num_layers
    bw = jnp.asarray(check_bits(bits_w, engine.qcfg.bit_choices, field="bits_w", shape=(S, L)))
    ba = jnp.asarray(check_bits(bits_a, engine.qcfg.bit_choices, field="bits_a", shape=(S, L)))
    run = engine.errors_fn
    errs, samples = [], []
    for s in range(0, bank.size, batch_size):
        e, x = run(bank.keys[s:s + batch_size], bank.traj[:, s:s + batch_size], bw, ba)
        errs.append(np.asarray(e))
        samples.append(np.asarray(x))
    e = np.concatenate(errs, axis=1)  # (S, N)
    out = {**(cost or engine.cost_model()).summary(np.asarray(bw), np.asarray(ba)),
           "per_step_error": e.mean(1).tolist(), "traj_error": float(e.mean()), "final_error": float(e[-1].mean()),
           "n": bank.size, "steps": S, "errors": e, "samples": np.concatenate(samples)}
    if with_fd and engine.den.dataset:
        from .metrics import sample_quality

        out["fd"] = sample_quality(out["samples"], engine.den.dataset)["fd"]
        out["fd_fp"] = sample_quality(np.asarray(bank.traj[-1]), engine.den.dataset)["fd"]
    return out


def uniform_bits(engine: QuantEngine, w: int, a: int, *, keep_ends: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(S, L) schedules with every entry w (weights) and a (activations); ``keep_ends``: the model's first and last
    layers (:func:`qpolicy.layers.end_layers`) at no fewer than that many bits (the PTQ convention, e.g. 8)."""
    shape = (engine.num_steps, engine.num_layers)
    bw, ba = np.full(shape, w, np.int32), np.full(shape, a, np.int32)
    if keep_ends is None:
        return bw, ba
    from .layers import keep_ends as raise_ends

    return raise_ends(engine.den, bw, keep_ends), raise_ends(engine.den, ba, keep_ends)
