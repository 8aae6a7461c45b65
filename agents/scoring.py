"""Scoring schedules on a (train) bank: the :class:`Baseline` record and batched error evaluation.

Train-bank *score* of a schedule = mean final-sample error + ``TRAJ_TIE`` * mean trajectory error
(the small trajectory term only breaks ties).

Batching: on CPU, ``jax.vmap`` over schedules turns every conv into a per-schedule grouped conv and is
several times *slower* per schedule than a loop over the already-jitted ``engine.errors_fn`` (measured
on digits16: 0.7 s vs 0.15 s per 16-image run), so ``chunk=None`` means a loop on CPU and vmapped
chunks of 16 schedules on accelerators. Pass ``chunk`` explicitly to override.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.banks import ReferenceBank
from qpolicy.engine import QuantEngine, auto_chunk

#: Weight of the mean trajectory error in the train-bank score (a tie-break next to the final error).
TRAJ_TIE = 1e-3


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One baseline schedule. bits_w / bits_a: int32 (S, L); info: how it was built (budget, stats)."""

    name: str
    bits_w: np.ndarray
    bits_a: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return bool(np.array_equal(self.bits_w, self.bits_a))


@functools.lru_cache(maxsize=16)
def _vmapped(engine: QuantEngine):
    def f(keys, ref, bw, ba):
        e, _ = jax.vmap(engine.errors_fn, in_axes=(None, None, 0, 0))(keys, ref, bw, ba)
        return e[:, -1].mean(-1), e.mean((1, 2))
    return jax.jit(f)


def train_scores(engine: QuantEngine, bank: ReferenceBank, schedules: Sequence[tuple[Any, Any]], *,
                 chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Final-sample and trajectory errors (means over the bank's images) of each (bits_w, bits_a) (S, L)
    schedule: two float64 arrays (N,). chunk: schedules per vmapped call (None: 1 on CPU, 16 otherwise)."""
    chunk = auto_chunk(chunk)
    n = len(schedules)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    S, L = engine.num_steps, engine.num_layers
    bw = np.stack([np.asarray(s[0], np.int32).reshape(S, L) for s in schedules])
    ba = np.stack([np.asarray(s[1], np.int32).reshape(S, L) for s in schedules])
    fin, trj = np.empty(n), np.empty(n)
    if chunk == 1:
        for i in range(n):
            e, _ = engine.errors_fn(bank.keys, bank.traj, jnp.asarray(bw[i]), jnp.asarray(ba[i]))
            e = np.asarray(e)
            fin[i], trj[i] = e[-1].mean(), e.mean()
        return fin, trj
    fn = _vmapped(engine)
    for s in range(0, n, chunk):
        w, a = bw[s:s + chunk], ba[s:s + chunk]
        m = len(w)
        if m < chunk:  # pad to one compiled shape
            w = np.concatenate([w, np.repeat(w[-1:], chunk - m, 0)])
            a = np.concatenate([a, np.repeat(a[-1:], chunk - m, 0)])
        f, t = fn(bank.keys, bank.traj, jnp.asarray(w), jnp.asarray(a))
        fin[s:s + m], trj[s:s + m] = np.asarray(f)[:m], np.asarray(t)[:m]
    return fin, trj


def score(fin, trj) -> np.ndarray:
    """Train-bank score: final error + TRAJ_TIE * trajectory error."""
    return np.asarray(fin) + TRAJ_TIE * np.asarray(trj)
