"""Warm start: the actor cloned from a static schedule plays it (per-step and layer-wise envs, tied and separate
W/A), PPO starts from those params, and bad schedules are refused with a clear message."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpolicy.agents.ppo_jax import ActorCritic, PPOConfig, policy_fn, train
from qpolicy.agents.warm_start import clone_schedule, schedule_actions, static_schedule
from qpolicy.envs import make_core
from qpolicy.envs.spaces import heads

CFG = PPOConfig(num_envs=4, num_steps=3, total_timesteps=4 * 3 * 2, num_minibatches=1, update_epochs=1,
                hidden=(32,), lr=1e-3, warm_start_epochs=300, warm_start_smoothing=0.1)


def _schedule(core, seed=0):
    """A schedule that changes with the step and the layer (so a policy that ignores t or l cannot play it)."""
    rng = np.random.default_rng(seed)
    choices = np.asarray(core.engine.qcfg.bit_choices)
    bw = choices[rng.integers(0, len(choices), (core.T, core.L))]
    ba = bw if core.tied else choices[rng.integers(0, len(choices), (core.T, core.L))]
    return bw, ba


def _greedy_rollout(core, params, cfg, n=3):
    """Choice indices (n, D, A) the deterministic policy takes on n episodes."""
    act = jax.jit(policy_fn(cfg, core), static_argnums=3)
    obs, states = core.jit_reset_batch(jax.random.key(7), core.default_params, n)
    out = []
    for _ in range(core.episode_length):
        a = act(params, obs, jax.random.key(0), True)
        out.append(np.asarray(a).reshape(n, -1))
        obs, states, *_ = core.jit_step_batch(jax.random.key(1), states, a, core.default_params)
    return np.stack(out, 1)


@pytest.mark.parametrize("layerwise, tied", [(False, False), (True, True)])
def test_cloned_actor_plays_the_schedule_and_ppo_starts_there(tiny_denoiser, layerwise, tied):
    core = make_core(model=tiny_denoiser, layerwise=layerwise, num_steps=3, images_per_env=1, bank_size=16,
                     bit_choices=(4, 6, 8, 32), tie_weights_activations=tied, quant_preset="plain")
    bw, ba = _schedule(core)
    want = schedule_actions(core, bw, ba)
    assert want.shape == (core.episode_length, (1 if layerwise else core.L) * (1 if tied else 2))
    params, info = clone_schedule(core, core.default_params, bw, ba, CFG, jax.random.key(0), episodes=16)
    assert info["accuracy"] == 1.0
    got = _greedy_rollout(core, params, CFG)
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))  # on fresh images too
    fresh = ActorCritic(nvec=heads(core.action_space())[0], hidden=CFG.hidden).init(jax.random.key(3),
                                                                                   jnp.zeros(core.obs_size))
    assert not np.array_equal(_greedy_rollout(core, fresh, CFG), got)  # an untrained actor does not play it
    if layerwise:
        return
    # PPO starts from the cloned params: with (almost) no learning its policy still plays the schedule
    res = train(core, CFG.replace(lr=1e-9, total_timesteps=12), progress=False, init_params=params)
    np.testing.assert_array_equal(_greedy_rollout(core, res.seed_params(0), CFG), got)


def test_bad_schedules_are_refused(tiny_denoiser, tmp_path):
    core = make_core(model=tiny_denoiser, num_steps=3, images_per_env=1, bank_size=16, bit_choices=(4, 6, 8, 32),
                     quant_preset="plain")
    bw, ba = _schedule(core)
    with pytest.raises(ValueError, match=r"must be \(T, L\)"):
        schedule_actions(core, bw[:2], ba[:2])
    with pytest.raises(ValueError, match="bits"):
        schedule_actions(core, np.full_like(bw, 5), np.full_like(bw, 5))  # 5 is not a choice
    with pytest.raises(ValueError, match="ties them"):
        schedule_actions(core, bw, np.where(bw == 4, 8, 4))
    with pytest.raises(FileNotFoundError, match="neither a source"):
        static_schedule(str(tmp_path / "missing.json"), core.engine, 0.05)
    with pytest.raises(ValueError, match="warm_start"):
        PPOConfig(warm_start="")
