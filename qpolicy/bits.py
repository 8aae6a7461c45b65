"""Bit choices: the one place for the choice-set rule, bit validation and choice-index <-> bits conversion.

A *choice set* is a non-empty, strictly increasing tuple of integer bitwidths in [2, 32]; 32 means float
passthrough. Policies act in *choice indices* (:data:`ChoiceIndex`: integer positions in the choice set);
the engine, the cost model and schedule files speak bits. Convert only here.
"""
from __future__ import annotations

from typing import Any, NewType, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BIT_CHOICES = (2, 3, 4, 5, 6, 8, 16, 32)
PASSTHROUGH_BITS = 32
MIN_CHOICE, MAX_CHOICE = 2, 32

#: Integer positions in a choice set (int array of any shape); ``bits = choices[index]``.
ChoiceIndex = NewType("ChoiceIndex", np.ndarray)


def _xp(a: Any):
    return jnp if isinstance(a, jax.Array) else np


def check_choices(choices: Any, *, field: str = "bit_choices", error: type[Exception] = ValueError
                  ) -> tuple[int, ...]:
    """The choice-set rule: a non-empty, strictly increasing sequence of integers in [2, 32].

    Returns the normalised tuple; raises ``error`` naming ``field`` otherwise (strings such as ``'48'`` are
    refused, not read digit by digit)."""
    ok = not isinstance(choices, (str, bytes)) and isinstance(choices, (Sequence, np.ndarray))
    vals: tuple[int, ...] = ()
    if ok:
        try:
            ok = all(not isinstance(b, bool) and float(b) == int(b) for b in choices)
            vals = tuple(int(b) for b in choices) if ok else ()
        except (TypeError, ValueError):
            ok = False
    if not ok or not vals or list(vals) != sorted(set(vals)) or vals[0] < MIN_CHOICE or vals[-1] > MAX_CHOICE:
        raise error(f"{field} must be strictly increasing integers in [{MIN_CHOICE}, {MAX_CHOICE}] (a non-empty "
                    f"list such as {list(DEFAULT_BIT_CHOICES)}; {PASSTHROUGH_BITS} = float), got {choices!r}")
    return vals


def check_bits(bits: Any, choices: Sequence[int], *, field: str = "bits", shape: tuple[int, ...] | None = None,
               names: Sequence[str] = (), error: type[Exception] = ValueError) -> np.ndarray:
    """Validate host bits: integers, each in ``choices``, optionally of ``shape``. Returns an int32 array.

    ``names``: layer names of the last axis, quoted in the message of a (T, L) array."""
    choices = tuple(int(c) for c in choices)
    a = np.asarray(bits)
    if shape is not None and a.shape != tuple(shape):
        raise error(f"{field} must have shape {tuple(shape)} (steps x layers), got {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.number) or not np.all(np.equal(np.mod(a, 1), 0)):
            raise error(f"{field} must hold integers, got dtype {a.dtype}")
    bad = np.argwhere(~np.isin(a, choices))
    if len(bad):
        pos = tuple(int(i) for i in bad[0])
        v = int(a[pos])
        where = f"{list(pos)}" if pos else ""
        at = ""
        if names and len(pos) == 2:
            at = f" at (step {pos[0]}, layer {pos[1]} ({names[pos[1]]}))"
        more = f"; {len(bad) - 1} more value(s) outside the set" if len(bad) > 1 else ""
        raise error(f"{field}{where} = {v}{at} is not an accepted bitwidth: bits {v} not in the accepted choice "
                    f"set {choices}{more}")
    return a.astype(np.int32)


def to_index(bits: Any, choices: Sequence[int], *, field: str = "bits") -> ChoiceIndex:
    """Bits -> choice indices. Host arrays are validated (error naming ``field``); traced arrays must already
    hold choices (every public entry point checks on the host first)."""
    if isinstance(bits, jax.core.Tracer) or isinstance(bits, jax.Array) and not isinstance(bits, np.ndarray):
        return ChoiceIndex(jnp.searchsorted(jnp.asarray(choices, jnp.int32), bits).astype(jnp.int32))
    b = check_bits(bits, choices, field=field)
    return ChoiceIndex(np.searchsorted(np.asarray(choices), b).astype(np.int64))


def to_bits(index: Any, choices: Sequence[int]) -> Any:
    """Choice indices -> bits (int32), NumPy in / NumPy out, JAX in / JAX out."""
    xp = _xp(index)
    return xp.asarray(choices, xp.int32)[index]


def snap(bits: Any, choices: Sequence[int]) -> np.ndarray:
    """The nearest choice in log2 space (maps e.g. a geometric mean of bits back onto the choice set)."""
    c = np.asarray(choices)
    return c[np.abs(np.log2(np.asarray(bits, np.float64))[..., None] - np.log2(c)).argmin(-1)]


def geometric_mean_schedule(bits: Any, choices: Sequence[int], axis: int = 0) -> np.ndarray:
    """Geometric mean of bits over ``axis`` (e.g. over input groups), snapped onto the choice set."""
    return snap(np.exp2(np.log2(np.asarray(bits, np.float64)).mean(axis)), choices)
