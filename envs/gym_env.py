"""Gymnasium adapters over the functional core: a single ``gymnasium.Env`` and a batched ``VectorEnv``."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space
from gymnasium.vector.vector_env import AutoresetMode

from qpolicy.sharding import env_sharding

from .core import EnvParams, Environment
from .registry import make_core
from .spaces import to_gymnasium


def spaces_for(core: Environment) -> tuple[spaces.Box, spaces.Space]:
    """(observation space, action space) of one env, as Gymnasium spaces."""
    params = core.default_params
    return to_gymnasium(core.observation_space(params)), to_gymnasium(core.action_space(params))


def check_actions(core: Environment, actions: Any, batch: int | None) -> np.ndarray:
    """Host-side validation of (batched) actions; returns an int32 array of the core's action shape."""
    a = np.asarray(actions)
    shape = core.action_space().shape
    want = shape if batch is None else (batch, *shape)
    if a.shape != want:
        if batch is not None and not shape and a.shape == (batch, 1):
            a = a.reshape(batch)
        else:
            raise ValueError(f"action must have shape {want} (indices into bit_choices {core.config.bit_choices}), "
                             f"got {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.mod(a, 1) == 0):
            raise ValueError(f"action must hold integer indices into bit_choices, got dtype {a.dtype}")
    n, what = core.C, f"bit_choices {core.config.bit_choices}"
    if getattr(core, "profiles", None) is not None:  # action_space 'profiles': an index into the K profiles
        n, what = core.K, f"the {core.K} precision profiles"
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"action entries must be indices in [0, {n - 1}] into {what}, got range "
                         f"[{a.min()}, {a.max()}]")
    return a.astype(np.int32)


def _info_np(info: dict, i: int | None = None) -> dict[str, Any]:
    out = {}
    for k, v in info.items():
        v = np.asarray(v if i is None else v[i])
        out[k] = int(v) if np.issubdtype(v.dtype, np.integer) else float(v)
    return out


class QuantDiffusionEnv(gym.Env):
    """``qpolicy/QuantDiffusion-v0`` (``layerwise=False``) or ``qpolicy/QuantDiffusionLayerwise-v0``.

    Keyword arguments: :class:`qpolicy.envs.EnvConfig` fields. Observations are float32 numpy arrays
    (layout: ``env.unwrapped.core.obs_spec()``); actions index ``bit_choices``. Seeding: ``reset(seed=)``
    seeds ``np_random``, from which each reset draws the JAX key that picks the bank images."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, *, layerwise: bool = False, render_mode: str | None = None, **kwargs: Any):
        # SB3's make_vec_env asks for "rgb_array" by default; render() then returns the current x_t
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.core = make_core(layerwise=layerwise, **kwargs)
        self.params: EnvParams = self.core.default_params
        self.observation_space, self.action_space = spaces_for(self.core)
        self._state = None
        self._done = False

    def render(self):
        """The first image of the current quantized x_t as an (H, W, 3) uint8 array (None before reset)."""
        if self.render_mode != "rgb_array" or self._state is None:
            return None
        x = np.asarray(self._state.x[0], np.float32)
        img = np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)
        return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]

    def _key(self) -> jax.Array:
        return jax.random.key(int(self.np_random.integers(0, 2**63 - 1)))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, self._state = self.core.jit_reset(self._key(), self.params)
        self._done = False
        return np.asarray(obs, np.float32), {}

    def step(self, action: Any):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self._done:  # Gymnasium's convention: an ended episode is not stepped further
            raise RuntimeError("the episode has ended (terminated or truncated); call reset() before step()")
        a = check_actions(self.core, action, None)
        obs, self._state, r, term, trunc, info = self.core.jit_step_env(self._key(), self._state, jnp.asarray(a),
                                                                         self.params)
        self._done = bool(term) or bool(trunc)
        return np.asarray(obs, np.float32), float(r), bool(term), bool(trunc), _info_np(info)


def make_layerwise_env(**kwargs: Any) -> QuantDiffusionEnv:
    return QuantDiffusionEnv(layerwise=True, **kwargs)


class QuantDiffusionVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` envs stepped in one jitted, vmapped call. Autoreset mode SAME_STEP: when an env finishes,
    the returned obs is already the next episode's; ``infos["final_obs"]`` (object array, ``_final_obs`` mask)
    holds the finishing observation and ``infos["final_info"]`` (dict of arrays with ``_`` masks) its info.
    Top-level info arrays carry the step info of the envs that did not finish (masks ``_key``).

    ``devices`` (:func:`qpolicy.sharding.env_sharding`): the env batch is split over that many local devices
    (None: all of them when they divide num_envs, else one); env params are replicated on each."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 1, *, layerwise: bool = False, render_mode: str | None = None,
                 devices: int | None = None, **kwargs: Any):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if render_mode is not None:
            raise ValueError(f"render_mode must be None (no rendering), got {render_mode!r}")
        kwargs.pop("max_episode_steps", None)
        self.render_mode = None
        self.num_envs = int(num_envs)
        self.sharding = env_sharding(self.num_envs, devices)  # checked before the core is built
        self.core = make_core(layerwise=layerwise, **kwargs)
        self.params: EnvParams = self.sharding.put_replicated(self.core.default_params)
        self._reset_batch, self._step_batch = self.core.compiled.sharded(self.sharding)
        self.single_observation_space, self.single_action_space = spaces_for(self.core)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._key = None
        self._states = None

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        if seed is not None or self._key is None:
            self._key = jax.random.key(int(np.random.SeedSequence(seed).generate_state(1)[0]))
            if seed is not None:
                self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
        self._key, k = jax.random.split(self._key)
        obs, self._states = self._reset_batch(k, self.params, self.num_envs)
        return np.asarray(obs, np.float32), {}

    def step(self, actions: Any):
        if self._states is None:
            raise RuntimeError("call reset() before step()")
        a = check_actions(self.core, actions, self.num_envs)
        self._key, k = jax.random.split(self._key)
        obs, self._states, r, term, trunc, info, final_obs = self._step_batch(
            k, self._states, self.sharding.put_envs(a), self.params)
        obs, r, term, trunc = (np.asarray(obs, np.float32), np.asarray(r, np.float64), np.asarray(term),
                               np.asarray(trunc))
        info = {k_: np.asarray(v) for k_, v in info.items()}
        done = term | trunc
        infos: dict[str, Any] = {}
        for k_, v in info.items():
            infos[k_] = np.where(done, np.zeros_like(v), v)
            infos[f"_{k_}"] = ~done
        if done.any():
            fo = np.full(self.num_envs, None, dtype=object)
            final_obs = np.asarray(final_obs, np.float32)
            for j in np.flatnonzero(done):
                fo[j] = final_obs[j]
            fi = {}
            for k_, v in info.items():
                fi[k_] = np.where(done, v, np.zeros_like(v))
                fi[f"_{k_}"] = done.copy()
            infos.update(final_obs=fo, _final_obs=done.copy(), final_info=fi, _final_info=done.copy())
        return obs, r, term, trunc, infos

    def close_extras(self, **kwargs: Any) -> None:
        self._states = None


def make_layerwise_vector_env(num_envs: int = 1, **kwargs: Any) -> QuantDiffusionVectorEnv:
    return QuantDiffusionVectorEnv(num_envs, layerwise=True, **kwargs)
