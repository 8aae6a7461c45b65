"""Gymnasium environments over quantized diffusion sampling (imported as ``qpolicy.envs``).

Importing registers ``qpolicy/QuantDiffusion-v0`` (one action per step: bits for every layer) and
``qpolicy/QuantDiffusionLayerwise-v0`` (one action per layer per step) with both ``entry_point`` and
``vector_entry_point``::

    env = gymnasium.make("qpolicy/QuantDiffusion-v0", model="digits16", lam=0.5)
    venv = gymnasium.make_vec("qpolicy/QuantDiffusion-v0", num_envs=64, model="digits16")
    sb3_env = qpolicy.envs.make_sb3_vec_env(64, model="digits16")

Keyword arguments are :class:`EnvConfig` fields. Contracts (observation, reward): :mod:`qpolicy.envs.core`.
"""
from __future__ import annotations

import gymnasium as gym

from .config import REWARD_MODES, EnvConfig
from .core import EnvParams, EnvState, Environment, QuantDiffusionCore, QuantDiffusionLayerwiseCore
from .gym_env import (QuantDiffusionEnv, QuantDiffusionVectorEnv, make_layerwise_env, make_layerwise_vector_env,
                      spaces_for)
from .profiles import QuantDiffusionProfileCore
from .registry import make_core, profiles_of
from .sb3 import QuantDiffusionSB3VecEnv, make_sb3_vec_env
from .spaces import Box, Discrete, MultiDiscrete

ENV_ID = "qpolicy/QuantDiffusion-v0"
LAYERWISE_ENV_ID = "qpolicy/QuantDiffusionLayerwise-v0"


def _register() -> None:
    specs = (
        (ENV_ID, "qpolicy.envs.gym_env:QuantDiffusionEnv", "qpolicy.envs.gym_env:QuantDiffusionVectorEnv"),
        (LAYERWISE_ENV_ID, "qpolicy.envs.gym_env:make_layerwise_env",
         "qpolicy.envs.gym_env:make_layerwise_vector_env"),
    )
    for env_id, entry, vec_entry in specs:
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, vector_entry_point=vec_entry)


_register()

__all__ = [
    "ENV_ID", "LAYERWISE_ENV_ID", "REWARD_MODES", "Box", "Discrete", "EnvConfig", "EnvParams", "EnvState",
    "Environment", "MultiDiscrete", "QuantDiffusionCore",
    "QuantDiffusionLayerwiseCore", "QuantDiffusionProfileCore", "QuantDiffusionEnv", "QuantDiffusionVectorEnv", "QuantDiffusionSB3VecEnv",
    "make_core", "profiles_of", "make_sb3_vec_env", "make_layerwise_env", "make_layerwise_vector_env", "spaces_for",
]
