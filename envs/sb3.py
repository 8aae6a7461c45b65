"""Stable-Baselines3 ``VecEnv`` adapter over the functional core (one jitted, vmapped call per step)."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from qpolicy.sharding import env_sharding

from .core import EnvParams
from .gym_env import check_actions, spaces_for
from .registry import make_core


class QuantDiffusionSB3VecEnv(VecEnv):
    """SB3 autoreset semantics: ``step_wait`` returns (obs, rewards, dones, infos); a finished env's obs is
    the next episode's first observation, its ``infos[i]["terminal_observation"]`` the last one, and
    ``infos[i]["TimeLimit.truncated"]`` is ``truncated and not terminated`` (always False here: episodes
    end by termination at x_0). Every info also carries the core's step info (error, cost, ...).
    ``devices``: as for :class:`qpolicy.envs.QuantDiffusionVectorEnv` (the env batch split over local devices)."""

    def __init__(self, num_envs: int, *, layerwise: bool = False, seed: int | None = None,
                 devices: int | None = None, **kwargs: Any):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        self.sharding = env_sharding(int(num_envs), devices)  # checked before the core is built
        self.core = make_core(layerwise=layerwise, **kwargs)
        self.params: EnvParams = self.sharding.put_replicated(self.core.default_params)
        self._reset_batch, self._step_batch = self.core.compiled.sharded(self.sharding)
        obs_space, act_space = spaces_for(self.core)
        super().__init__(int(num_envs), obs_space, act_space)
        self._key = jax.random.key(0 if seed is None else int(seed))
        self._states = None
        self._actions = None

    def reset(self) -> np.ndarray:
        if self._seeds[0] is not None:
            self._key = jax.random.key(int(self._seeds[0]))
        self._reset_seeds()
        self._reset_options()
        self._key, k = jax.random.split(self._key)
        obs, self._states = self._reset_batch(k, self.params, self.num_envs)
        return np.asarray(obs, np.float32)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = check_actions(self.core, actions, self.num_envs)

    def step_wait(self):
        if self._states is None:
            raise RuntimeError("call reset() before step()")
        self._key, k = jax.random.split(self._key)
        obs, self._states, r, term, trunc, info, final_obs = self._step_batch(
            k, self._states, self.sharding.put_envs(self._actions), self.params)
        obs, r = np.asarray(obs, np.float32), np.asarray(r, np.float32)
        term, trunc = np.asarray(term), np.asarray(trunc)
        dones = term | trunc
        info = {k_: np.asarray(v).tolist() for k_, v in info.items()}
        infos = [{k_: v[i] for k_, v in info.items()} for i in range(self.num_envs)]
        if dones.any():
            final_obs = np.asarray(final_obs, np.float32)
            for i in np.flatnonzero(dones):
                infos[i]["terminal_observation"] = final_obs[i]
                infos[i]["TimeLimit.truncated"] = bool(trunc[i] and not term[i])
        return obs, r, dones, infos

    def close(self) -> None:
        self._states = None

    def _indices(self, indices) -> Sequence[int]:
        return list(self._get_indices(indices))

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        return [getattr(self, method_name)(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]


def make_sb3_vec_env(num_envs: int, **kwargs: Any) -> QuantDiffusionSB3VecEnv:
    """SB3 VecEnv of ``num_envs`` envs; kwargs: ``layerwise``, ``seed`` and :class:`EnvConfig` fields."""
    return QuantDiffusionSB3VecEnv(num_envs, **kwargs)
