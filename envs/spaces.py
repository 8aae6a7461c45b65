"""gymnax-style spaces of the functional env core (``action_space(params)`` / ``observation_space(params)``).

Small, immutable and JAX-friendly: ``sample(key)`` and ``contains(x)`` work under jit; :func:`to_gymnasium`
turns a space into its Gymnasium counterpart for the adapters.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces as gym_spaces


@dataclasses.dataclass(frozen=True)
class Discrete:
    """One integer action in [0, n): a scalar int32."""

    n: int

    @property
    def shape(self) -> tuple[int, ...]:
        return ()

    @property
    def nvec(self) -> tuple[int, ...]:
        """Categorical head sizes (one head)."""
        return (int(self.n),)

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.randint(key, (), 0, self.n, jnp.int32)

    def contains(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.logical_and(x.shape == (), jnp.all((x >= 0) & (x < self.n)))


@dataclasses.dataclass(frozen=True)
class MultiDiscrete:
    """A vector of integer actions, entry j in [0, nvec[j]): int32 (len(nvec),)."""

    nvec: tuple[int, ...]

    def __post_init__(self) -> None:
        nvec = tuple(int(n) for n in self.nvec)
        if not nvec or min(nvec) < 1:
            raise ValueError(f"nvec must be a non-empty tuple of sizes >= 1, got {self.nvec!r}")
        object.__setattr__(self, "nvec", nvec)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.nvec),)

    def sample(self, key: jax.Array) -> jax.Array:
        u = jax.random.uniform(key, self.shape)
        return jnp.floor(u * jnp.asarray(self.nvec, jnp.float32)).astype(jnp.int32)

    def contains(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if x.shape != self.shape:
            return jnp.asarray(False)
        return jnp.all((x >= 0) & (x < jnp.asarray(self.nvec)))


@dataclasses.dataclass(frozen=True)
class Box:
    """A float array of ``shape`` with elementwise bounds ``low`` / ``high`` (scalars)."""

    low: float
    high: float
    shape: tuple[int, ...]
    dtype: Any = jnp.float32

    def sample(self, key: jax.Array) -> jax.Array:
        lo, hi = max(self.low, -1e6), min(self.high, 1e6)
        return jax.random.uniform(key, self.shape, self.dtype, lo, hi)

    def contains(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if x.shape != tuple(self.shape):
            return jnp.asarray(False)
        return jnp.all((x >= self.low) & (x <= self.high))


Space = Discrete | MultiDiscrete | Box


def heads(space: Discrete | MultiDiscrete) -> tuple[tuple[int, ...], bool]:
    """(categorical head sizes, scalar_action) of a discrete action space."""
    if isinstance(space, Discrete):
        return space.nvec, True
    if isinstance(space, MultiDiscrete):
        return space.nvec, False
    raise ValueError(f"a discrete action space (Discrete or MultiDiscrete) is needed, got {type(space).__name__}")


def to_gymnasium(space: Space) -> gym_spaces.Space:
    """The Gymnasium space with the same shape, bounds and dtype."""
    if isinstance(space, Discrete):
        return gym_spaces.Discrete(int(space.n))
    if isinstance(space, MultiDiscrete):
        return gym_spaces.MultiDiscrete(np.asarray(space.nvec, np.int64))
    return gym_spaces.Box(space.low, space.high, tuple(space.shape), np.dtype(space.dtype))
