"""JAX-native PPO: a bandit with a known optimum, an end-to-end run on the tiny diffusion core (vmapped
seeds, one trace of the update across chunks), policy save/load, config validation."""
from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpolicy.agents.ppo_jax import (PPOConfig, ActorCritic, core_meta, load_policy, make_train, policy_fn,
                                    save_policy, train)
from qpolicy.envs.base import FunctionalEnv
from qpolicy.envs.spaces import Box, Discrete, MultiDiscrete

TARGET = (2, 0, 3)


class BanditCore(FunctionalEnv):
    """One-decision episodes, constant observation; MultiDiscrete (4, 4, 4) action,
    reward = -Σ_j |a_j - target_j| (optimum: a = target, reward 0). gymnax-style API (auto-reset from the base)."""

    obs_size = 4
    episode_length = 1

    def action_space(self, params=None):
        return MultiDiscrete((4, 4, 4))

    def observation_space(self, params=None):
        return Box(-1.0, 1.0, (self.obs_size,))

    def reset(self, key, params):
        return jnp.zeros((self.obs_size,), jnp.float32), jnp.zeros((), jnp.int32)

    def step_env(self, key, state, action, params):
        reward = -jnp.abs(action - jnp.asarray(TARGET)).sum().astype(jnp.float32)
        return jnp.zeros((self.obs_size,), jnp.float32), state, reward, jnp.ones((), bool), jnp.zeros((), bool), {}


BANDIT_CFG = PPOConfig(num_envs=16, num_steps=4, total_timesteps=16 * 4 * 40, lr=3e-3, ent_coef=0.0,
                       hidden=(32, 32), num_seeds=2)


@pytest.fixture(scope="module")
def bandit_result():
    """make_train is pure: jit(vmap(.)) over seed keys trains every seed in one compile."""
    fn = make_train(BanditCore(), None, BANDIT_CFG)
    out = jax.jit(jax.vmap(fn))(jax.random.split(jax.random.key(0), BANDIT_CFG.num_seeds))
    return out, fn


def seed_params(out, i):
    return jax.tree_util.tree_map(lambda x: x[i], out["params"])


def test_bandit_learns_target(bandit_result):
    out, fn = bandit_result
    ret = np.asarray(out["metrics"]["episode_return"])
    assert ret.shape == (BANDIT_CFG.num_seeds, BANDIT_CFG.num_updates)
    act = policy_fn(BANDIT_CFG, BanditCore())
    for s in range(BANDIT_CFG.num_seeds):
        a = act(seed_params(out, s), jnp.zeros(4), jax.random.key(0), True)
        np.testing.assert_array_equal(np.asarray(a), TARGET)
    assert np.all(ret[:, :3].mean(1) < -1.0)  # started far from the optimum (random policy: about -3.5)
    assert np.all(ret[:, -5:].mean(1) > -0.2)
    assert fn.trace_counts == {"update": 1}


def test_tiny_diffusion_end_to_end(tiny_denoiser):
    from qpolicy.envs import make_core

    core = make_core(model=tiny_denoiser, num_steps=3, images_per_env=2, bank_size=16)
    cfg = PPOConfig(num_envs=4, num_steps=6, total_timesteps=4 * 6 * 4, num_minibatches=2, update_epochs=2,
                    hidden=(16,), num_seeds=2)
    res = train(core, cfg, progress=True, num_chunks=2)  # 2 chunks of 2 updates
    assert res.trace_counts == {"update": 1}
    for k in ("episode_return", "final_error", "cost", "total_loss", "policy_loss", "value_loss", "entropy"):
        assert res.metrics[k].shape == (2, 4), k
        assert np.all(np.isfinite(res.metrics[k])), k
    assert np.all(res.metrics["episodes"] == 8)  # 4 envs x 6 decisions / episode length 3
    assert np.all((res.metrics["cost"] > 0) & (res.metrics["cost"] <= 1 + 1e-6))
    assert res.env_steps_per_s > 0 and res.wall_s > 0
    act = jax.jit(policy_fn(cfg, core), static_argnums=3)
    a = act(res.seed_params(1), jnp.zeros((5, core.obs_size)), jax.random.key(0), True)
    assert a.shape == (5, core.action_space().shape[0]) and a.dtype == jnp.int32
    assert int(a.min()) >= 0 and int(a.max()) < core.C


def test_save_load_round_trip(tmp_path, bandit_result):
    core = BanditCore()
    params = seed_params(bandit_result[0], 1)
    save_policy(tmp_path / "pol", params, BANDIT_CFG, core_meta(core))
    params2, cfg2, meta = load_policy(tmp_path / "pol")
    assert cfg2 == BANDIT_CFG and meta["action_nvec"] == [4, 4, 4] and meta["obs_size"] == 4
    obs = jax.random.normal(jax.random.key(1), (32, 4))
    a1 = policy_fn(BANDIT_CFG, core)(params, obs, jax.random.key(2), False)
    a2 = policy_fn(cfg2, meta)(params2, obs, jax.random.key(2), False)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    assert a1.shape == (32, 3)


def test_load_errors(tmp_path, bandit_result):
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "missing")
    d = save_policy(tmp_path / "pol", seed_params(bandit_result[0], 0), BANDIT_CFG, core_meta(BanditCore()))
    (d / "policy.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_policy(d)
    d = save_policy(tmp_path / "pol2", seed_params(bandit_result[0], 0), BANDIT_CFG, core_meta(BanditCore()))
    (d / "policy.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(d)
    d = save_policy(tmp_path / "pol3", seed_params(bandit_result[0], 0), BANDIT_CFG, core_meta(BanditCore()))
    doc = json.loads((d / "policy.json").read_text())
    doc["meta"]["obs_size"] = 7
    (d / "policy.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="does not match"):
        load_policy(d)


def test_discrete_core_gets_scalar_actions():
    class OneChoice(FunctionalEnv):
        def action_space(self, params=None):
            return Discrete(5)

        def observation_space(self, params=None):
            return Box(-1.0, 1.0, (3,))

    net_out = policy_fn(PPOConfig(hidden=(8,)), OneChoice())
    params = ActorCritic(nvec=(5,), hidden=(8,)).init(jax.random.key(0), jnp.zeros(3))
    a = net_out(params, jnp.zeros((6, 3)), jax.random.key(1), False)
    assert a.shape == (6,) and int(a.max()) < 5


@pytest.mark.parametrize("field, value", [
    ("num_envs", 0), ("num_steps", -1), ("total_timesteps", 2.5), ("update_epochs", 0), ("num_seeds", 0),
    ("lr", 0.0), ("lr", float("nan")), ("gamma", 1.5), ("gae_lambda", -0.1), ("clip_eps", 0), ("ent_coef", -1),
    ("vf_coef", "x"), ("max_grad_norm", 0), ("hidden", ()), ("hidden", (64, 0)), ("seed", -1),
    ("anneal_lr", 1), ("num_minibatches", 3), ("cost_target", -0.1), ("dual_lr", 0),
])
def test_bad_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})


def test_too_few_timesteps_names_field():
    with pytest.raises(ValueError, match="total_timesteps"):
        PPOConfig(num_envs=16, num_steps=32, total_timesteps=100)


@pytest.mark.parametrize("num_seeds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_checkpointed_run_resumes_bit_exactly(tmp_path, num_seeds):
    """Killed after the checkpoint at update 4 of 8 (and with a checkpoint of another config refused), the resumed
    run ends with the uninterrupted run's params and metrics."""
    from qpolicy.agents.ppo_jax import Checkpointer

    cfg = PPOConfig(num_envs=4, num_steps=2, total_timesteps=4 * 2 * 8, hidden=(8,), num_seeds=num_seeds)
    full = train(BanditCore(), cfg, progress=False, num_chunks=8)

    class Killed(Exception):
        pass

    def die_at_5(m, first):
        if first == 5:
            raise Killed

    ck = Checkpointer(tmp_path, every=2, fingerprint="a" * 16)
    with pytest.raises(Killed):
        train(BanditCore(), cfg, progress=False, num_chunks=8, checkpoint=ck, on_chunk=die_at_5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppo_00000004.json", "ppo_00000004.msgpack"]
    with pytest.raises(ValueError, match="made under another config"):
        train(BanditCore(), cfg, progress=False, num_chunks=8, checkpoint=Checkpointer(tmp_path, 2, "b" * 16))
    firsts = []
    res = train(BanditCore(), cfg, progress=False, num_chunks=8, checkpoint=Checkpointer(tmp_path, 2, "a" * 16),
                on_chunk=lambda m, first: firsts.append(first))
    assert firsts == [4, 5, 6, 7]
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(res.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k, v in res.metrics.items():
        np.testing.assert_array_equal(v, full.metrics[k][:, 4:])


# ---------------------------------------------------------------------------------------------- Lagrangian
@flax.struct.dataclass
class LamParams:
    lam: jax.Array


class EasyHardCore(FunctionalEnv):
    """One decision per episode on an easy or a hard input (observed one-hot, 50/50): bits index a in 0..3 at cost a,
    error (3 - a) * (0.01 easy, 1.0 hard), reward -(error + lam * cost). Under a *batch-mean* cost target of 1.5 the
    optimum spends everything on the hard inputs (easy -> 0, hard -> 3: mean cost 1.5, mean error 0.015); it is the
    unconstrained optimum for any lam in (0.01, 1)."""

    obs_size = 2
    episode_length = 1

    def action_space(self, params=None):
        return MultiDiscrete((4,))

    def observation_space(self, params=None):
        return Box(0.0, 1.0, (self.obs_size,))

    def reset(self, key, params):
        hard = jax.random.bernoulli(key).astype(jnp.int32)
        return jax.nn.one_hot(hard, 2), hard

    def step_env(self, key, state, action, params):
        a = action[0].astype(jnp.float32)
        err = (3.0 - a) * jnp.where(state == 1, 1.0, 0.01)
        obs, new = self.reset(key, params)
        return (obs, new, -(err + params.lam * a), jnp.ones((), bool), jnp.zeros((), bool),
                {"cost": a, "error": err})


LAG_CFG = PPOConfig(num_envs=32, num_steps=4, total_timesteps=32 * 4 * 80, lr=1e-3, ent_coef=0.01, hidden=(16,),
                    num_seeds=2, cost_target=1.5, dual_lr=0.5)


def test_lagrangian_meets_a_batch_mean_cost_target_by_spending_bits_on_hard_inputs():
    """Starting from lam = 3 (every input at 0 bits, cost 0), the dual variable falls until the batch-mean cost
    meets the target, and the policy reaches the constrained optimum: 0 on easy inputs, 3 on hard ones. With lam
    fixed at 3 (no cost_target) the same run stays at cost 0."""
    core, p0 = EasyHardCore(), LamParams(lam=jnp.asarray(3.0))
    res = train(core, LAG_CFG, env_params=p0, progress=False, num_chunks=4)
    act = policy_fn(LAG_CFG, core)
    for s in range(LAG_CFG.num_seeds):
        a = act(res.seed_params(s), jnp.eye(2), jax.random.key(0), True)
        np.testing.assert_array_equal(np.asarray(a)[:, 0], [0, 3])  # easy, hard
    m = res.metrics
    assert np.all(np.abs(m["cost"][:, -10:].mean(1) - 1.5) < 0.2)
    assert np.all((m["lam"][:, -1] > 0.01) & (m["lam"][:, -1] < 1.0))
    assert np.all(m["lam"][:, 0] == 3.0) and np.all(m["cost_std"][:, -10:].mean(1) > 1.0)  # costs differ by input
    fixed = train(core, LAG_CFG.replace(cost_target=None), env_params=p0, progress=False, num_chunks=4)
    assert np.all(fixed.metrics["cost"][:, -10:].mean(1) < 0.2) and "lam" not in fixed.metrics


def test_lagrangian_refuses_env_params_without_lam():
    with pytest.raises(ValueError, match="cost_target needs env params with a cost weight 'lam'"):
        make_train(BanditCore(), (), LAG_CFG)
    with pytest.raises(ValueError, match="cost_target"):
        PPOConfig(cost_target=0.0)
