"""The JAX-PPO policy: action heads read from an env's action space (or saved metadata), ``core_meta`` (the env
description saved with a policy), the ActorCritic MLPs, the multi-head categorical distribution, and ``policy_fn``
(acting with one seed's params).

A ``MultiDiscrete`` action space gets one categorical head per entry (logits (..., sum(nvec)) split per head); a
``Discrete(C)`` space (layer-wise env with tied bits) one head, and the env receives a scalar."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.envs.spaces import heads

from .ppo_config import PPOConfig


# ---------------------------------------------------------------------------------------------- action space
def _action_spec(core: Any) -> tuple[tuple[int, ...], bool]:
    """(per-head sizes, scalar_action) of an env (from its action space) or of a :func:`core_meta` dict (saved
    policies: ``action_nvec`` [] means a single Discrete(``num_choices``))."""
    if not isinstance(core, Mapping):
        return heads(core.action_space())
    if "action_nvec" not in core:
        raise ValueError("core metadata lacks 'action_nvec' (build it with qpolicy.agents.ppo_jax.core_meta)")
    nvec = tuple(int(n) for n in core["action_nvec"])
    if nvec:
        if any(n < 1 for n in nvec):
            raise ValueError(f"action_nvec entries must be >= 1, got {nvec}")
        return nvec, False
    if core.get("num_choices") is None:
        raise ValueError("empty action_nvec (a single Discrete action) needs 'num_choices' in the metadata")
    return (int(core["num_choices"]),), True


def _obs_size(core: Any) -> int:
    if isinstance(core, Mapping):
        return int(core["obs_size"])
    return int(core.observation_space().shape[0])


def core_meta(core: Any) -> dict:
    """JSON-able description of an env for :func:`save_policy`: obs_size, action_nvec ([] for a single Discrete
    action), num_choices, episode_length, layerwise, and the env config (non-JSON values as strings) when the
    env has one."""
    nvec, scalar = _action_spec(core)
    meta: dict[str, Any] = {"obs_size": _obs_size(core), "action_nvec": [] if scalar else list(nvec),
                            "num_choices": nvec[0] if scalar or len(set(nvec)) == 1 else None,
                            "episode_length": int(getattr(core, "episode_length", 0)) or None,
                            "layerwise": bool(getattr(core, "layerwise", False))}
    cfg = getattr(core, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        env = {}
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if f.name == "model" and not isinstance(v, (str, Path)):
                v = getattr(v, "name", type(v).__name__)
            env[f.name] = list(v) if isinstance(v, tuple) else (v if isinstance(v, (int, float, str, bool))
                                                                 or v is None else str(v))
        meta["env_config"] = env
    prof = getattr(core, "profiles", None)
    if prof is not None:  # action_space 'profiles': what each action means travels with the policy
        meta["profiles"] = prof.to_dict()
    return meta


# ---------------------------------------------------------------------------------------------- network
class ActorCritic(nn.Module):
    """Actor and critic MLPs (separate tanh torsos of widths ``hidden``).

    ``__call__(obs (..., D)) -> (logits (..., sum(nvec)), value (...))``: one categorical per nvec entry,
    its logits being the entry's slice of the concatenated logits."""

    nvec: tuple[int, ...]
    hidden: tuple[int, ...] = (128, 128)

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        ortho = nn.initializers.orthogonal
        zeros = nn.initializers.zeros
        a = obs
        for i, h in enumerate(self.hidden):
            a = nn.tanh(nn.Dense(h, kernel_init=ortho(math.sqrt(2)), bias_init=zeros, name=f"actor_{i}")(a))
        logits = nn.Dense(sum(self.nvec), kernel_init=ortho(0.01), bias_init=zeros, name="actor_out")(a)
        v = obs
        for i, h in enumerate(self.hidden):
            v = nn.tanh(nn.Dense(h, kernel_init=ortho(math.sqrt(2)), bias_init=zeros, name=f"critic_{i}")(v))
        value = nn.Dense(1, kernel_init=ortho(1.0), bias_init=zeros, name="critic_out")(v)
        return logits, value[..., 0]


class _MultiCategorical:
    """Independent categoricals over the heads of a MultiDiscrete action. logits (..., sum(nvec)),
    actions (..., H) int32. Equal head sizes use one reshape instead of H slices."""

    def __init__(self, logits: jax.Array, nvec: tuple[int, ...]):
        self.nvec = nvec
        if len(set(nvec)) == 1:
            self.heads = [logits.reshape(*logits.shape[:-1], len(nvec), nvec[0])]
            self.uniform = True
        else:
            self.heads = list(jnp.split(logits, np.cumsum(nvec)[:-1], axis=-1))
            self.uniform = False

    def _logp_tables(self):
        return [jax.nn.log_softmax(h, axis=-1) for h in self.heads]

    def log_prob(self, actions: jax.Array) -> jax.Array:
        tabs = self._logp_tables()
        if self.uniform:
            lp = jnp.take_along_axis(tabs[0], actions[..., None], axis=-1)[..., 0]
            return lp.sum(-1)
        return sum(jnp.take_along_axis(t, actions[..., j:j + 1], axis=-1)[..., 0] for j, t in enumerate(tabs))

    def entropy(self) -> jax.Array:
        ent = [-(jnp.exp(t) * t).sum(-1) for t in self._logp_tables()]
        return ent[0].sum(-1) if self.uniform else sum(ent)

    def sample(self, key: jax.Array) -> jax.Array:
        if self.uniform:
            return jax.random.categorical(key, self.heads[0], axis=-1).astype(jnp.int32)
        keys = jax.random.split(key, len(self.heads))
        return jnp.stack([jax.random.categorical(k, h, axis=-1) for k, h in zip(keys, self.heads)],
                         -1).astype(jnp.int32)

    def mode(self) -> jax.Array:
        if self.uniform:
            return jnp.argmax(self.heads[0], axis=-1).astype(jnp.int32)
        return jnp.stack([jnp.argmax(h, axis=-1) for h in self.heads], -1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- policy
def policy_fn(cfg: PPOConfig, core: Any) -> Callable[..., jax.Array]:
    """``act(params, obs (..., D), key, deterministic=False) -> action`` for one seed's params.

    action: (..., H) int32 choice indices (H heads of a MultiDiscrete space), or (...) for a Discrete space. deterministic (bool or traced bool) takes the argmax of each head. ``core`` may be a core
    or a :func:`core_meta` dict. Pure and jittable."""
    nvec, scalar = _action_spec(core)
    net = ActorCritic(nvec=nvec, hidden=cfg.hidden)

    def act(params, obs, key, deterministic=False):
        logits, _ = net.apply(params, jnp.asarray(obs, jnp.float32))
        dist = _MultiCategorical(logits, nvec)
        a = jnp.where(deterministic, dist.mode(), dist.sample(key))
        return a[..., 0] if scalar else a

    return act
