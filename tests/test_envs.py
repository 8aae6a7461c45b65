"""Gymnasium environments (qpolicy.envs): checkers, vector envs, seeding, banks, reward telescoping,
SB3 training, config validation, no recompilation. Tiny random U-Net 8x8, T=3, small banks."""
from __future__ import annotations

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qpolicy.envs as E
from qpolicy.engine import relative_error
from qpolicy.metrics import fd_proxy

T = 3


pytestmark = pytest.mark.usefixtures("module_cache")  # one cache per module (conftest)


@pytest.fixture(scope="module")
def den(tiny_denoiser):
    return tiny_denoiser


@pytest.fixture(scope="module")
def kw(den):
    return dict(model=den, num_steps=T, bank_size=8, images_per_env=2)


def _run_episode(core, params, key, rng, n_decisions):
    obs, state = core.jit_reset(key, params)
    rewards, actions, infos = [], [], []
    for _ in range(n_decisions):
        shape = core.action_space().shape
        a = rng.integers(0, core.C, size=shape or None).astype(np.int32)
        obs, state, r, term, trunc, info = core.jit_step_env(key, state, jnp.asarray(a), params)
        rewards.append(float(r)), actions.append(a), infos.append(info)
    assert bool(term) and not bool(trunc)
    return state, np.asarray(rewards), actions, infos


@pytest.mark.parametrize("env_id", [E.ENV_ID, E.LAYERWISE_ENV_ID])
def test_gymnasium_check_env(env_id, kw):
    from gymnasium.utils.env_checker import check_env

    env = gym.make(env_id, **kw)
    check_env(env.unwrapped, skip_render_check=True)
    core = env.unwrapped.core
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (len(core.obs_spec()),) == env.observation_space.shape
    assert not any("ref" in n or "error" in n for n in core.obs_spec())  # deployability rule


def test_sb3_check_env(kw):
    from stable_baselines3.common.env_checker import check_env

    check_env(gym.make(E.ENV_ID, **kw).unwrapped, warn=False)


@pytest.mark.parametrize("env_id", [E.ENV_ID, E.LAYERWISE_ENV_ID])
def test_vector_env_full_episode(env_id, kw):
    venv = gym.make_vec(env_id, num_envs=64, **kw)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    core = venv.unwrapped.core if hasattr(venv, "unwrapped") else venv.core
    length = T * core.L if core.layerwise else T
    obs, _ = venv.reset(seed=3)
    assert obs.shape == (64, core.obs_size) and obs.dtype == np.float32
    total = np.zeros(64)
    for k in range(length):
        obs, r, term, trunc, info = venv.step(venv.action_space.sample())
        assert np.all(np.isfinite(r)) and not trunc.any()
        total += r
        assert term.all() == (k == length - 1) and (term.any() == term.all())
    assert info["_final_obs"].all() and info["final_obs"][0].shape == (core.obs_size,)
    np.testing.assert_allclose(-total, info["final_info"]["cost"] + info["final_info"]["error"], rtol=1e-4, atol=1e-6)
    assert np.all(obs[:, 0] == 0.0)  # autoreset: step_frac of the fresh episode


def test_same_seed_same_trajectory(kw):
    env = gym.make(E.ENV_ID, **kw)

    def roll(seed):
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for k in range(T):
            obs, r, *_ = env.step(np.full(env.action_space.shape, k + 1))
            out += [obs, np.array([r])]
        return np.concatenate(out)

    np.testing.assert_array_equal(roll(5), roll(5))
    assert not np.array_equal(roll(5), roll(6))


def test_train_eval_banks_disjoint(kw):
    train = E.make_core(**kw).default_params
    ev = E.make_core(**{**kw, "bank": "eval"}).default_params
    kt = np.asarray(jax.random.key_data(train.bank_keys)).reshape(train.bank_keys.shape[0], -1)
    ke = np.asarray(jax.random.key_data(ev.bank_keys)).reshape(ev.bank_keys.shape[0], -1)
    assert not {tuple(r) for r in kt} & {tuple(r) for r in ke}
    for t in range(T + 1):  # every FP trajectory of one bank differs from every one of the other
        d = np.abs(np.asarray(train.bank_traj[t])[:, None] - np.asarray(ev.bank_traj[t])[None]).max((2, 3, 4))
        assert d.min() > 1e-3
    # the eval env uses the eval bank and shares the train env's compiled functions
    assert E.make_core(**{**kw, "bank": "eval"}).jit_step_env is E.make_core(**kw).jit_step_env


@pytest.mark.parametrize("layerwise", [False, True])
def test_reward_telescopes(layerwise, kw):
    core = E.make_core(layerwise=layerwise, **kw)
    assert core.engine is E.make_core(layerwise=not layerwise, **kw).engine
    eng, cm, L = core.engine, core.engine.cost_model(), core.L
    e_ind = relative_error(eng.initial(core.default_params.bank_keys[:2]), core.default_params.bank_traj[0, :2])
    assert float(e_ind.max()) == 0.0  # x_T is shared: e_{-1} = 0
    n = T * L if layerwise else T
    choices = np.asarray(core.config.bit_choices)
    alpha, lam, budget, beta_fd = 1.7, 0.3, 0.02, 0.5
    base = core.default_params.replace(alpha=jnp.float32(alpha), lam=jnp.float32(lam), budget=jnp.float32(budget),
                                       beta_fd=jnp.float32(beta_fd))
    totals = {}
    for mode in E.REWARD_MODES:
        params = base.replace(reward_mode=jnp.int32(E.REWARD_MODES.index(mode)))
        state, rewards, actions, infos = _run_episode(core, params, jax.random.key(11), np.random.default_rng(1), n)
        totals[mode] = (rewards, state, actions, infos)
    rewards, state, actions, infos = totals["delta"]
    bw = np.asarray([choices[a.reshape(-1)[0]] for a in actions]).reshape(T, L) if layerwise else \
        choices[np.stack(actions)]
    ba = bw  # tied
    # independent computation: quantized trajectory of the episode's images vs the FP bank
    keys = base.bank_keys[state.idx]
    ref = base.bank_traj[:, state.idx]
    errs, x0 = eng.errors_fn(keys, ref, jnp.asarray(bw), jnp.asarray(ba))  # relative_error per step, x̂_0
    e = np.minimum(np.asarray(errs), 10.0).mean(1)  # (T,)
    total_cost = cm.summary(bw, ba)["bops_rel_fp32"]
    np.testing.assert_allclose(float(infos[-1]["cost"]), total_cost, rtol=1e-5)
    np.testing.assert_allclose(float(infos[-1]["error"]), e[-1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(rewards.sum(), -(alpha * e[-1] + lam * total_cost), rtol=1e-4, atol=1e-6)
    # per-step error deltas: the step's forward decision carries -alpha*(e_i - e_{i-1}) - lam*c
    fwd = [k for k in range(n) if (not layerwise or k % L == L - 1)]
    np.testing.assert_allclose([float(infos[k]["error"]) for k in fwd], e, rtol=1e-4, atol=1e-7)
    r_term = totals["terminal"][0]
    assert np.all(r_term[:-1] == 0)
    fd = float(totals["terminal"][3][-1]["fd_proxy"])
    np.testing.assert_allclose(fd, float(fd_proxy(x0, ref[-1])), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r_term[-1], -(alpha * e[-1] + beta_fd * fd + lam * total_cost), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(totals["budget"][0].sum(), -(alpha * e[-1] + lam * max(0.0, total_cost - budget)),
                               rtol=1e-4, atol=1e-6)


def test_no_recompilation(kw):
    core = E.make_core(**kw)
    params = core.default_params
    obs, state = core.jit_reset(jax.random.key(0), params)
    core.jit_step_env(jax.random.key(0), state, jnp.zeros(core.L, jnp.int32), params)  # warm-up
    before = core.trace_counts["step_env"]
    rng = np.random.default_rng(0)
    for k in range(50):
        a = jnp.asarray(rng.integers(0, core.C, core.L), jnp.int32)
        p = params.replace(lam=jnp.float32(rng.uniform()), reward_mode=jnp.int32(k % 3))  # data, not constants
        core.jit_step_env(jax.random.key(k), state, a, p)
    assert core.trace_counts["step_env"] == before


def test_sb3_ppo_and_a2c_train(kw):
    from stable_baselines3 import A2C, PPO

    venv = E.make_sb3_vec_env(64, seed=0, **kw)
    obs = venv.reset()
    assert obs.shape == (64, venv.core.obs_size)
    _, _, dones, infos = venv.step(np.zeros((64, venv.core.L), np.int64))
    assert not dones.any() and "cost" in infos[0]
    for _ in range(T - 1):
        _, _, dones, infos = venv.step(np.zeros((64, venv.core.L), np.int64))
    assert dones.all() and infos[0]["terminal_observation"].shape == (venv.core.obs_size,)
    assert infos[0]["TimeLimit.truncated"] is False
    model = PPO("MlpPolicy", venv, n_steps=8, batch_size=128, n_epochs=2, seed=0, device="cpu")
    model.learn(total_timesteps=2048)
    assert model.num_timesteps >= 2048
    A2C("MlpPolicy", venv, n_steps=4, seed=0, device="cpu").learn(total_timesteps=512)


def test_exports(kw):
    assert isinstance(gym.make(E.ENV_ID, **kw).unwrapped, E.QuantDiffusionEnv)
    assert isinstance(E.make_core(**kw), E.QuantDiffusionCore)
    assert isinstance(E.make_core(layerwise=True, **kw), E.QuantDiffusionLayerwiseCore)
    spec = E.make_core(layerwise=True, **kw).obs_spec()
    assert spec[:3] == ["step_frac", "t_frac", "t_sin"] and spec[-1] == "cost" and "layer_frac" in spec


@pytest.mark.parametrize("field,value", [
    ("num_steps", 0), ("sampler", "euler"), ("bit_choices", (4, 2)), ("bit_choices", (1, 8)),
    ("tie_weights_activations", "yes"), ("images_per_env", 0), ("reward", "sparse"), ("lam", -1.0),
    ("alpha", float("nan")), ("budget", -0.1), ("bank_size", 1), ("bank", "calib"), ("act_ranges", "minmax"),
    ("model", 3), ("error_clip", 0.0),
])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        E.EnvConfig(**{"images_per_env": 2, field: value})


def test_bad_action(kw):
    env = gym.make(E.ENV_ID, **kw).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="bit_choices"):
        env.step(np.full(env.action_space.shape, 99))
