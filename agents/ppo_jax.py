"""JAX-native PPO (PureJaxRL style): rollouts with the vmapped env core, GAE and the minibatch epochs
form one jitted update; whole training runs and several seeds (vmapped) compile once.

Works with any :class:`qpolicy.envs.base.FunctionalEnv` (gymnax style: ``reset``, ``step_env``,
``action_space(params)``, ``observation_space(params)``; the base derives the auto-resetting, batched
``reset_batch`` / ``step_batch`` used here), e.g. :func:`qpolicy.envs.make_core`::

    core = qpolicy.envs.make_core(model="digits16", num_steps=10, images_per_env=2)
    res = train(core, PPOConfig(num_envs=16, total_timesteps=50_000, num_seeds=2))
    act = policy_fn(res.config, core)
    a = act(res.seed_params(0), obs, key, True)      # greedy bits (choice indices)
    save_policy("runs/ppo", res.seed_params(0), res.config, core_meta(core))

Actions: a ``MultiDiscrete`` action space gets one categorical head per entry (logits (..., sum(nvec)) split per
head); a ``Discrete(C)`` space (layer-wise env with tied bits) one head, and the env receives a scalar.

Episodes end on ``terminated | truncated`` (the core auto-resets inside ``step``); a truncated episode is
not bootstrapped (the quantized-diffusion cores never truncate: fixed episode length).

Metrics (per update, averaged over the episodes that finished during that update's rollout; NaN if none
did): ``episode_return``; from the env ``info`` at the last decision: ``final_error`` (info["error"]: e of
the final sample), ``cost`` (info["cost"]: total relative BOPs C_total), ``traj_error``, ``bits_w_mean``,
``bits_a_mean``, ``fd_proxy`` where the core reports them; ``episodes`` (count); and the loss terms averaged
over epochs and minibatches: ``total_loss``, ``policy_loss``, ``value_loss``, ``entropy`` (summed over heads),
``approx_kl``, ``clip_frac``; plus ``lr``.

This module holds the training (the pure update, the chunked driver ``train``); the config is in
:mod:`~qpolicy.agents.ppo_config`, the network, action heads and ``policy_fn`` in :mod:`~qpolicy.agents.ppo_networks`,
checkpoints and policy folders in :mod:`~qpolicy.agents.ppo_checkpoint`. All their public names are importable from
here.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qpolicy.config import is_int
from qpolicy.sharding import EnvSharding, env_sharding

# re-exported: every name stays importable from qpolicy.agents.ppo_jax
from .ppo_checkpoint import META_FILE, POLICY_FORMAT, POLICY_VERSION, WEIGHTS_FILE, Checkpointer, load_policy, \
    save_policy  # noqa: F401
from .ppo_config import PPOConfig
from .ppo_networks import ActorCritic, _action_spec, _MultiCategorical, _obs_size, core_meta, policy_fn  # noqa: F401

__all__ = ["PPOConfig", "ActorCritic", "PPOTrainer", "PPOResult", "Checkpointer", "make_train", "train", "policy_fn",
           "core_meta", "save_policy", "load_policy"]

#: env info keys averaged over finished episodes -> metric name
INFO_METRICS = {"error": "final_error", "cost": "cost", "traj_error": "traj_error",
                "bits_w_mean": "bits_w_mean", "bits_a_mean": "bits_a_mean", "fd_proxy": "fd_proxy"}
LOSS_METRICS = ("total_loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac")
#: bounds of the Lagrangian dual variable (cost_target): a target no policy can reach saturates here, visibly
LAM_MIN, LAM_MAX = 1e-6, 1e6


# ---------------------------------------------------------------------------------------------- training
@flax.struct.dataclass
class RunnerState:
    """Carry of the training loop for one seed (env batch on axis 0 of env_state/obs/ep_return)."""

    ENV_FIELDS = ("env_state", "obs", "ep_return")  # split over the devices (qpolicy.sharding)

    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array
    ep_return: jax.Array
    rng: jax.Array
    update: jax.Array
    lam: jax.Array  # the env's cost weight this seed trains under (moved by the dual update with cost_target)


@flax.struct.dataclass
class Transition:
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    done: jax.Array


class PPOTrainer:
    """The pure pieces of one seed's training run (vmap/jit them freely).

    ``init(key, env_params) -> RunnerState``; ``update(runner, env_params) -> (runner, metrics)``: one PPO
    update (rollout of num_steps x num_envs, GAE, update_epochs x num_minibatches Adam steps);
    ``run(runner, env_params, n)``: n updates in a ``lax.scan`` (metrics stacked on axis 0);
    ``__call__(key)``: the whole run with the env params given at construction -> {"params", "metrics"}.
    ``trace_counts["update"]`` counts traces of the update (one trace = one compilation when jitted).
    ``sharding`` (default: from ``cfg.devices``, :mod:`qpolicy.sharding`): each device steps its slice of the envs
    (shard_map), and sharding constraints keep the env axis of env states, observations and rollouts split."""

    def __init__(self, core: Any, env_params: Any, cfg: PPOConfig, sharding: EnvSharding | None = None):
        if not isinstance(cfg, PPOConfig):
            raise ValueError(f"cfg must be a PPOConfig, got {type(cfg).__name__}")
        self.core, self.env_params, self.cfg = core, env_params, cfg
        if cfg.cost_target is not None and env_params is not None and not hasattr(env_params, "lam"):
            raise ValueError(f"cost_target needs env params with a cost weight 'lam' (the quantized-diffusion envs); "
                             f"{type(env_params).__name__} has none")
        self.sharding = sharding if sharding is not None else env_sharding(cfg.num_envs, cfg.devices)
        self.nvec, self.scalar_action = _action_spec(core)
        self.obs_size = _obs_size(core)
        self.network = ActorCritic(nvec=self.nvec, hidden=cfg.hidden)
        self.num_updates = cfg.num_updates
        self.trace_counts: collections.Counter = collections.Counter()
        steps_per_update = cfg.update_epochs * cfg.num_minibatches
        if cfg.anneal_lr:
            self.lr_schedule = lambda count: cfg.lr * (1.0 - (count // steps_per_update) / self.num_updates)
        else:
            self.lr_schedule = lambda count: cfg.lr * jnp.ones_like(count, jnp.float32)
        self.tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                              optax.adam(learning_rate=self.lr_schedule, eps=1e-5))

    # -- env helpers
    def _env_step(self, key, states, actions, env_params):
        # the env's batched step, each device stepping its slice of the envs (the layer-wise core runs the denoiser
        # forward only on decisions that complete a step: all envs are in lockstep here)
        a = actions[..., 0] if self.scalar_action else actions
        return self.sharding.step_batch(self.core, key, states, a, env_params)[:6]

    def init(self, key: jax.Array, env_params: Any = None, params: Any = None) -> RunnerState:
        """The runner before the first update; ``params``: the agent's starting params (e.g. a warm start),
        else a fresh initialisation."""
        env_params = self.env_params if env_params is None else env_params
        k_net, k_env, rng = jax.random.split(key, 3)
        if params is None:
            params = self.network.init(k_net, jnp.zeros((self.obs_size,), jnp.float32))
        obs, env_state = self.sharding.reset_batch(self.core, k_env, env_params, self.cfg.num_envs)
        return RunnerState(params=params, opt_state=self.tx.init(params), env_state=env_state,
                           obs=obs.astype(jnp.float32), ep_return=jnp.zeros((self.cfg.num_envs,), jnp.float32),
                           rng=rng, update=jnp.zeros((), jnp.int32),
                           lam=jnp.asarray(getattr(env_params, "lam", 0.0), jnp.float32))

    def _loss(self, params, batch: Transition, advantages, targets):
        cfg = self.cfg
        logits, value = self.network.apply(params, batch.obs)
        dist = _MultiCategorical(logits, self.nvec)
        log_prob = dist.log_prob(batch.action)
        v_clipped = batch.value + jnp.clip(value - batch.value, -cfg.clip_eps, cfg.clip_eps)
        value_loss = 0.5 * jnp.maximum((value - targets) ** 2, (v_clipped - targets) ** 2).mean()
        log_ratio = log_prob - batch.log_prob
        ratio = jnp.exp(log_ratio)
        adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv).mean()
        entropy = dist.entropy().mean()
        total = pg + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
        aux = {"total_loss": total, "policy_loss": pg, "value_loss": value_loss, "entropy": entropy,
               "approx_kl": ((ratio - 1) - log_ratio).mean(),
               "clip_frac": (jnp.abs(ratio - 1) > cfg.clip_eps).mean()}
        return total, aux

    def update(self, runner: RunnerState, env_params: Any) -> tuple[RunnerState, dict]:
        self.trace_counts["update"] += 1
        cfg = self.cfg
        if cfg.cost_target is not None:  # Lagrangian: the env's cost weight is this seed's dual variable
            env_params = env_params.replace(lam=runner.lam)

        def env_step(carry, _):
            r = carry
            rng, k_act, k_env = jax.random.split(r.rng, 3)
            logits, value = self.network.apply(r.params, r.obs)
            dist = _MultiCategorical(logits, self.nvec)
            action = dist.sample(k_act)
            log_prob = dist.log_prob(action)
            obs, env_state, reward, term, trunc, info = self._env_step(k_env, r.env_state, action, env_params)
            reward = reward.astype(jnp.float32)
            done = jnp.logical_or(term, trunc)
            ep_ret = r.ep_return + reward
            ep_info = {"episode_return": ep_ret}
            ep_info.update({name: info[k].astype(jnp.float32) for k, name in INFO_METRICS.items() if k in info})
            tr = Transition(obs=r.obs, action=action, log_prob=log_prob, value=value, reward=reward, done=done)
            r = r.replace(rng=rng, **self.sharding.constrain(dict(
                env_state=env_state, obs=obs.astype(jnp.float32), ep_return=jnp.where(done, 0.0, ep_ret))))
            return r, (tr, ep_info)

        runner, (traj, ep_info) = jax.lax.scan(env_step, runner, None, cfg.num_steps)
        traj, ep_info = self.sharding.constrain((traj, ep_info), axis=1)  # (num_steps, num_envs, ...)
        _, last_value = self.network.apply(runner.params, runner.obs)

        def gae_step(carry, tr):
            gae, next_value = carry
            nonterminal = 1.0 - tr.done.astype(jnp.float32)
            delta = tr.reward + cfg.gamma * next_value * nonterminal - tr.value
            gae = delta + cfg.gamma * cfg.gae_lambda * nonterminal * gae
            return (gae, tr.value), gae

        _, advantages = jax.lax.scan(gae_step, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
        targets = advantages + traj.value

        flat = lambda x: x.reshape((cfg.batch_size,) + x.shape[2:])
        batch = (jax.tree_util.tree_map(flat, traj), flat(advantages), flat(targets))
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def epoch(carry, _):
            params, opt_state, rng = carry
            rng, k_perm = jax.random.split(rng)
            perm = jax.random.permutation(k_perm, cfg.batch_size)
            mbs = jax.tree_util.tree_map(
                lambda x: x[perm].reshape((cfg.num_minibatches, cfg.minibatch_size) + x.shape[1:]), batch)

            def minibatch(c, mb):
                p, o = c
                mb = self.sharding.constrain(mb)  # rows split (when they divide): data-parallel gradient
                (_, aux), grads = grad_fn(p, *mb)
                upd, o = self.tx.update(grads, o, p)
                return (optax.apply_updates(p, upd), o), aux

            (params, opt_state), aux = jax.lax.scan(minibatch, (params, opt_state), mbs)
            return (params, opt_state, rng), aux

        rng, k_upd = jax.random.split(runner.rng)
        (params, opt_state, _), aux = jax.lax.scan(epoch, (runner.params, runner.opt_state, k_upd), None,
                                                   cfg.update_epochs)

        done = traj.done.astype(jnp.float32)
        n_done = done.sum()
        metrics = {k: jnp.where(n_done > 0, (v * done).sum() / jnp.maximum(n_done, 1.0), jnp.nan)
                   for k, v in ep_info.items()}
        metrics["episodes"] = n_done
        metrics.update({k: aux[k].mean() for k in LOSS_METRICS})
        metrics["lr"] = jnp.asarray(self.lr_schedule(runner.update * cfg.update_epochs * cfg.num_minibatches),
                                    jnp.float32)
        lam = runner.lam
        if "cost" in ep_info:  # the spread of the finished episodes' costs (what a batch budget lets vary)
            var = (((ep_info["cost"] - metrics["cost"]) ** 2) * done).sum() / jnp.maximum(n_done, 1.0)
            metrics["cost_std"] = jnp.where(n_done > 0, jnp.sqrt(var), jnp.nan)
            if cfg.cost_target is not None:
                metrics["lam"] = runner.lam
                step = cfg.dual_lr * (metrics["cost"] / cfg.cost_target - 1.0)
                lam = jnp.where(n_done > 0, jnp.clip(runner.lam * jnp.exp(step), LAM_MIN, LAM_MAX), runner.lam)
        runner = runner.replace(params=params, opt_state=opt_state, rng=rng, update=runner.update + 1, lam=lam)
        return runner, metrics

    def run(self, runner: RunnerState, env_params: Any, num_updates: int) -> tuple[RunnerState, dict]:
        return jax.lax.scan(lambda r, _: self.update(r, env_params), runner, None, num_updates)

    def __call__(self, key: jax.Array) -> dict:
        runner = self.init(key, self.env_params)
        runner, metrics = self.run(runner, self.env_params, self.num_updates)
        return {"params": runner.params, "metrics": metrics}


def make_train(core: Any, env_params: Any, cfg: PPOConfig) -> PPOTrainer:
    """``train(key) -> {"params": agent params, "metrics": {name: (num_updates,)}}`` for one seed, pure:
    ``jax.jit(jax.vmap(make_train(core, params, cfg)))(keys)`` trains several seeds in one compile.
    The returned :class:`PPOTrainer` also exposes ``init``/``update``/``run`` for chunked runs."""
    return PPOTrainer(core, env_params, cfg)


# ---------------------------------------------------------------------------------------------- driver
@dataclasses.dataclass(frozen=True)
class PPOResult:
    """params: agent params stacked over seeds (leading axis num_seeds); metrics: {name: (num_seeds,
    num_updates) np.ndarray}; env_steps_per_s: env decisions per second (all seeds, after compilation);
    wall_s: total wall time including compilation; compile_s: compilation time; trace_counts: traces of
    the update function (1 for a healthy run); devices: how many devices the env batch was split over;
    runner: the final :class:`RunnerState` (seed axis first), left on the devices as trained (env axis split)."""

    params: Any
    metrics: dict
    config: PPOConfig
    env_steps_per_s: float
    wall_s: float
    compile_s: float = 0.0
    trace_counts: dict = dataclasses.field(default_factory=dict)
    devices: int = 1
    runner: Any = None

    def seed_params(self, i: int = 0) -> Any:
        """Params of seed ``i`` (for :func:`policy_fn` / :func:`save_policy`)."""
        return jax.tree_util.tree_map(lambda x: x[i], self.params)


def _chunk_size(num_updates: int, target_chunks: int) -> int:
    """Largest divisor of num_updates <= ceil(num_updates / target_chunks): equal chunks, so one compile."""
    cap = max(1, -(-num_updates // max(target_chunks, 1)))
    return max(d for d in range(1, cap + 1) if num_updates % d == 0)


def train(core: Any, cfg: PPOConfig, *, env_params: Any = None, progress: bool = True,
          num_chunks: int = 20, checkpoint: Checkpointer | None = None,
          on_chunk: Callable[[dict, int], None] | None = None, init_params: Any = None) -> PPOResult:
    """Train ``cfg.num_seeds`` seeds (vmapped) on ``core``; returns a :class:`PPOResult`.

    The run is split into equal chunks of updates (about ``num_chunks``; each chunk a jitted, vmapped
    ``lax.scan`` of the update, compiled once ahead of time) so a tqdm bar can report progress and env steps/s.
    env_params defaults to ``core.default_params``. ``checkpoint`` resumes from its latest checkpoint and saves
    periodically (a resumed result's metrics cover the updates run after the checkpoint);
    ``on_chunk(metrics {name: (num_seeds, chunk)}, first_update)`` is called after every chunk. ``init_params``:
    every seed's starting agent params (a warm start, :mod:`qpolicy.agents.warm_start`); a checkpoint wins."""
    if not isinstance(cfg, PPOConfig):
        raise ValueError(f"cfg must be a PPOConfig, got {type(cfg).__name__}")
    if not is_int(num_chunks) or num_chunks < 1:
        raise ValueError(f"num_chunks must be an integer >= 1, got {num_chunks!r}")
    if env_params is None:
        env_params = core.default_params
    t0 = time.perf_counter()
    trainer = make_train(core, env_params, cfg)
    n_up = trainer.num_updates
    chunk = _chunk_size(n_up, num_chunks)
    keys = jax.random.split(jax.random.key(cfg.seed), cfg.num_seeds)

    if cfg.num_seeds == 1:
        # No seed vmap for one seed: under vmap the layer-wise core's lax.cond (forward only on a step's last
        # layer) would become a select that runs the denoiser on every decision. A leading seed axis of 1 is
        # added around the unbatched calls so results keep the (num_seeds, ...) layout.
        add = lambda t: jax.tree_util.tree_map(lambda x: x[None], t)
        drop = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)
        init_f = lambda k, p, a: add(trainer.init(k[0], p, a))
        run_f = lambda r, p: add(trainer.run(drop(r), p, chunk))
    else:
        init_f = jax.vmap(trainer.init, in_axes=(0, None, None))
        run_f = jax.vmap(lambda r, p: trainer.run(r, p, chunk), in_axes=(0, None))
    # env axis 1 (after the seed axis) of env states / observations / returns split over the devices, the rest
    # replicated; fixed in- and out-shardings so every chunk reuses the one compiled update
    es = trainer.sharding
    env_params = es.put_replicated(env_params)
    if init_params is not None:
        init_params = es.put_replicated(init_params)
    r_sh = es.state_shardings(jax.eval_shape(init_f, keys, env_params, init_params), RunnerState.ENV_FIELDS,
                              axis=1)
    init = jax.jit(init_f, out_shardings=r_sh)
    run = jax.jit(run_f, in_shardings=(r_sh, es.replicated), out_shardings=(r_sh, es.replicated), donate_argnums=0)
    runner = init(keys, env_params, init_params)
    start = 0
    if checkpoint is not None:
        runner, start = checkpoint.restore(runner)
        runner = jax.device_put(runner, r_sh)  # restored on the host: back onto this run's devices
        if start % chunk or start > n_up:
            raise ValueError(f"checkpoint at update {start} does not fit this run ({n_up} updates in chunks of "
                             f"{chunk}); delete {checkpoint.folder} to start over")
    run_c = run.lower(runner, env_params).compile()
    jax.block_until_ready(runner)
    compile_s = time.perf_counter() - t0

    steps_per_chunk = chunk * cfg.batch_size * cfg.num_seeds
    chunks_metrics = []
    t_run = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_up, initial=start, desc="ppo", unit="upd", dynamic_ncols=True)
    try:
        for c in range(start // chunk, n_up // chunk):
            runner, m = run_c(runner, env_params)
            m = jax.device_get(m)
            chunks_metrics.append(m)
            if on_chunk is not None:
                on_chunk(m, c * chunk)
            if checkpoint is not None:
                checkpoint.maybe_save(runner, (c + 1) * chunk, final=(c + 1) * chunk == n_up)
            if bar is not None:
                el = time.perf_counter() - t_run
                done_steps = len(chunks_metrics) * steps_per_chunk
                last = {k: float(np.nanmean(m[k][:, -1])) if k in m else float("nan")
                        for k in ("episode_return", "final_error", "cost")}
                bar.set_postfix(steps_s=f"{done_steps / max(el, 1e-9):,.0f}", ret=f"{last['episode_return']:.4g}",
                                err=f"{last['final_error']:.3g}", cost=f"{last['cost']:.4f}")
                bar.update(chunk)
    finally:
        if bar is not None:
            bar.close()
    jax.block_until_ready(runner)
    run_s = time.perf_counter() - t_run
    if chunks_metrics:
        metrics = {k: np.concatenate([np.asarray(m[k]) for m in chunks_metrics], axis=1) for k in chunks_metrics[0]}
    else:  # resumed from the final checkpoint: nothing left to run
        metrics = {}
    total_steps = (n_up - start) * cfg.batch_size * cfg.num_seeds
    return PPOResult(params=jax.device_get(runner.params), metrics=metrics, config=cfg,
                     env_steps_per_s=total_steps / max(run_s, 1e-9), wall_s=time.perf_counter() - t0,
                     compile_s=compile_s, trace_counts=dict(trainer.trace_counts), devices=es.size,
                     runner=runner)
