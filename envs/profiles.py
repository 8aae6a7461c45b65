"""The per-step env in the profile action space (``EnvConfig.action_space: profiles``).

Each step's action is one integer k in [0, K): the env runs sampler step i with profile k's per-layer bits
(:class:`qpolicy.profiles.Profiles`), so a deployed runtime that holds K model variants can follow the policy. The
dynamics, cost, reward, info and observation are the per-step env's with the profile's choice indices in place of a
per-layer action (the ``prev_bits`` block holds the previous step's profile bits): stepping with k equals stepping
the ``bits`` env with the profile's indices (tested). The layer-wise env has no profile mode (a profile is a whole
step's bits).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.profiles import Profiles

from .core import QuantDiffusionCore
from .spaces import Discrete


class QuantDiffusionProfileCore(QuantDiffusionCore):
    """``qpolicy/QuantDiffusion-v0`` with ``action_space: profiles``: action = a profile index (scalar int)."""

    def __init__(self, config, engine, profiles: Profiles, compiled=None):
        self.profiles = profiles
        iw, ia = profiles.indices()
        self._pw, self._pa = jnp.asarray(iw, jnp.int32), jnp.asarray(ia, jnp.int32)  # (K, L) choice indices
        self.K = profiles.K
        super().__init__(config, engine, compiled)
        if profiles.L != self.L:
            raise ValueError(f"profiles have {profiles.L} layers, the env's model {self.L}")

    def action_space(self, params=None) -> Discrete:
        return Discrete(self.K)

    def _split(self, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = jnp.clip(jnp.asarray(action, jnp.int32).reshape(-1)[0], 0, self.K - 1)
        return self._pw[k], self._pa[k]

    def action_indices(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host-side: actions (n,) or (n, 1) profile indices -> (n, L) weight / activation choice indices."""
        k = np.asarray(actions).reshape(len(actions), -1)[:, 0]
        return np.asarray(self._pw)[k], np.asarray(self._pa)[k]
