"""The gymnax-style functional environment interface the agents program against.

A subclass implements ``reset(key, params) -> (obs, state)``, ``step_env(key, state, action, params) -> (obs,
state, reward, terminated, truncated, info)`` (no auto-reset), ``action_space(params)`` and
``observation_space(params)`` (:mod:`qpolicy.envs.spaces`). The base class derives the auto-resetting ``step`` and
the batched ``reset_batch`` / ``step_batch`` that adapters, the JAX agents and the evaluation all use. Every method
is pure: jit and vmap it freely.
"""
from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp


class FunctionalEnv:
    """Base of functional envs (gymnax 1.0 style); see the module doc."""

    @functools.cached_property
    def trace_counts(self) -> collections.Counter:
        """Traces of each public pure function (a trace = a (re)compilation when jitted)."""
        return collections.Counter()

    @functools.cached_property
    def default_params(self) -> Any:
        """Env params used when none are given (None for envs without params)."""
        return None

    # ------------------------------------------------------------------ to implement
    def reset(self, key: jax.Array, params: Any) -> tuple[jax.Array, Any]:
        raise NotImplementedError

    def step_env(self, key: jax.Array, state: Any, action: jax.Array, params: Any):
        raise NotImplementedError

    def action_space(self, params: Any = None):
        raise NotImplementedError

    def observation_space(self, params: Any = None):
        raise NotImplementedError

    # ------------------------------------------------------------------ derived
    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any):
        """Step with auto-reset: on an episode's last decision the returned obs/state are those of a fresh
        episode drawn with ``key``; reward, flags and info belong to the finished decision."""
        self.trace_counts["step"] += 1
        return self.autoreset(key, *self.step_env(key, state, action, params), params)[:6]

    def autoreset(self, key, obs, state, reward, term, trunc, info, params):
        """(obs, state, reward, term, trunc, info, final_obs) with obs/state replaced by a fresh episode's where
        the episode ended; final_obs is the observation the decision produced."""
        done = jnp.logical_or(term, trunc)
        obs_re, state_re = self.reset(key, params)
        sel = lambda a, b: jnp.where(done, a, b)
        return (sel(obs_re, obs), jax.tree_util.tree_map(sel, state_re, state), reward, term, trunc, info, obs)

    def reset_batch(self, key: jax.Array, params: Any, num_envs: int):
        """reset for ``num_envs`` envs with keys split from ``key`` -> (obs (n, D), states)."""
        return self.reset_batch_keys(jax.random.split(key, num_envs), params)

    def reset_batch_keys(self, keys: jax.Array, params: Any):
        """reset_batch with the per-env keys (n,) given (``qpolicy.sharding`` splits them before the device
        split, so every env draws the same key on any number of devices)."""
        self.trace_counts["reset_batch"] += 1
        return jax.vmap(self.reset, in_axes=(0, None))(keys, params)

    def step_batch(self, key: jax.Array, states: Any, actions: jax.Array, params: Any):
        """Step n envs (states/actions batched on axis 0) with SAME_STEP auto-reset -> (obs, states, reward,
        terminated, truncated, info, final_obs)."""
        return self.step_batch_keys(jax.random.split(key, actions.shape[0]), states, actions, params)

    def step_batch_keys(self, keys: jax.Array, states: Any, actions: jax.Array, params: Any):
        """step_batch with the per-env keys (n,) given (override this one to change batched stepping)."""
        self.trace_counts["step_batch"] += 1
        f = lambda k, s, a: self.autoreset(k, *self.step_env(k, s, a, params), params)
        return jax.vmap(f)(keys, states, actions)
