"""Warm start: a precision policy that begins where search ends.

Before RL, the actor is fit by behaviour cloning to play a static schedule (bits[T, L]): the env rolls that
schedule for a batch of episodes, and the actor learns to output the schedule's choice indices from the
observations it sees on the way (cross-entropy with label smoothing, so PPO still explores around it). The
critic is left as initialised. The schedule comes from the sensitivity ILP on the train bank at a budget, or from
a schedule file (any :class:`qpolicy.schedule.BitSchedule` JSON or bits file for the model).

    src = static_schedule("ilp", core.engine, budget=0.03)          # -> StaticStart (bits, compute spent)
    params, info = clone_schedule(core, core.default_params, src.bits_w, src.bits_a, PPOConfig(...), key)
    res = ppo_jax.train(core, cfg, init_params=params)

The search's compute (its sensitivity probes) is part of the learned policy's compute: ``qpolicy train`` records
it in ``train_summary.json`` and the evaluation charges it to the learned row's ``search_forwards``.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qpolicy.bits import to_index

#: schedule sources besides a file path
SOURCES = ("ilp",)
#: train-bank images the ILP's sensitivity probes run on (as the evaluation's baselines)
SENS_IMAGES = 16


@dataclasses.dataclass(frozen=True)
class StaticStart:
    """A static schedule to start from: bits_w, bits_a (T, L) int; source ("ilp" or the file); forwards (denoiser
    image-forwards spent finding it) and seconds."""

    bits_w: np.ndarray
    bits_a: np.ndarray
    source: str
    forwards: int
    seconds: float


def static_schedule(spec: str, engine: Any, budget: float, *, progress: bool = False) -> StaticStart:
    """The schedule ``spec`` names: "ilp" (HAWQ-style sensitivity ILP at ``budget`` bops_rel_fp32, fit on the
    first 16 train-bank images) or a path to a schedule / bits file for ``engine``'s model and sampler."""
    t0 = time.perf_counter()
    if spec == "ilp":
        from qpolicy.banks import reference_bank

        from .sensitivity import layer_sensitivity, sensitivity_mixed_precision

        bank = reference_bank(engine, "train", SENS_IMAGES)
        sens, info = layer_sensitivity(engine, bank, max_images=SENS_IMAGES, progress=progress, return_info=True)
        b = sensitivity_mixed_precision(engine, sens, budget)
        return StaticStart(b.bits_w, b.bits_a, "ilp", int(info["probes"] * info["images"] * engine.num_steps),
                           time.perf_counter() - t0)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"warm_start: {spec!r} is neither a source ({', '.join(SOURCES)}) nor a schedule "
                                f"file")
    from qpolicy.schedule import load_schedule_for

    s = load_schedule_for(path, engine.den, engine.sampler, bit_choices=engine.qcfg.bit_choices)
    return StaticStart(np.asarray(s.bits_w), np.asarray(s.bits_a), str(path), 0, time.perf_counter() - t0)


def schedule_actions(core: Any, bits_w: np.ndarray, bits_a: np.ndarray) -> np.ndarray:
    """The action of every decision of an episode that plays the static schedule: (D, A) int32 choice indices,
    D = core.episode_length; per-step env: A = L (tied) or 2L ([w | a]); layer-wise: A = 1 (tied) or 2 ([w, a]).
    Bits outside the choice set get a clear error."""
    choices = core.engine.qcfg.bit_choices
    T, L = core.T, core.L
    bw, ba = np.asarray(bits_w), np.asarray(bits_a)
    if bw.shape != (T, L) or ba.shape != (T, L):
        raise ValueError(f"warm_start schedule: bits_w and bits_a must be (T, L) = {(T, L)}, got {bw.shape}, "
                         f"{ba.shape}")
    iw, ia = to_index(bw, choices), to_index(ba, choices)
    if core.tied and not np.array_equal(iw, ia):
        raise ValueError("warm_start schedule: weight and activation bits differ, but the env ties them "
                         "(env.tie_weights_activations: true); use a tied schedule or untie the env")
    if core.layerwise:
        a = iw.reshape(T * L, 1) if core.tied else np.stack([iw.reshape(-1), ia.reshape(-1)], -1)
    else:
        a = iw if core.tied else np.concatenate([iw, ia], -1)
    return a.astype(np.int32)


def _head_logits(logits: jax.Array, nvec: tuple[int, ...]) -> list[jax.Array]:
    """The per-head slices of the actor's concatenated logits (..., sum(nvec))."""
    return jnp.split(logits, np.cumsum(nvec)[:-1], axis=-1)


def _nll(logits: jax.Array, actions: jax.Array, nvec: tuple[int, ...], smoothing: float) -> jax.Array:
    """Mean over rows and heads of the label-smoothed cross-entropy of the actions (..., H) under the logits."""
    loss = 0.0
    for j, (h, n) in enumerate(zip(_head_logits(logits, nvec), nvec)):
        target = optax.smooth_labels(jax.nn.one_hot(actions[..., j], n), smoothing)
        loss = loss + optax.softmax_cross_entropy(h, target).mean()
    return loss / len(nvec)


def clone_schedule(core: Any, env_params: Any, bits_w: np.ndarray, bits_a: np.ndarray, cfg: Any, key: jax.Array,
                   *, epochs: int | None = None, smoothing: float | None = None, episodes: int = 64
                   ) -> tuple[Any, dict]:
    """PPO params (:class:`qpolicy.agents.ppo_jax.ActorCritic` of ``cfg.hidden``) whose actor plays the schedule.

    Rolls the schedule for ``episodes`` episodes (bank images drawn by ``key``), then ``epochs`` full-batch Adam
    steps (cfg.lr x 10) on the label-smoothed cross-entropy (defaults: cfg.warm_start_epochs,
    cfg.warm_start_smoothing). Returns (params, info: accuracy of the greedy actions on the rollout, loss, rows)."""
    from qpolicy.envs.spaces import heads

    from .ppo_jax import ActorCritic

    epochs = cfg.warm_start_epochs if epochs is None else epochs
    smoothing = cfg.warm_start_smoothing if smoothing is None else smoothing
    nvec, scalar = heads(core.action_space(env_params))
    acts = jnp.asarray(schedule_actions(core, bits_w, bits_a))  # (D, A)
    k_env, k_net, k_steps = jax.random.split(key, 3)

    @jax.jit
    def rollout(k_env, k_steps, env_params):
        obs, states = core.reset_batch(k_env, env_params, episodes)

        def step(carry, xs):
            obs, states = carry
            k, a = xs
            act = jnp.broadcast_to(a[0] if scalar else a, (episodes,) + (() if scalar else a.shape))
            obs2, states, *_ = core.step_batch(k, states, act, env_params)
            return (obs2, states), obs

        keys = jax.random.split(k_steps, acts.shape[0])
        _, seen = jax.lax.scan(step, (obs, states), (keys, acts))
        return seen  # (D, episodes, obs)

    obs = rollout(k_env, k_steps, env_params).astype(jnp.float32)
    D = acts.shape[0]
    x = obs.reshape(D * episodes, -1)
    y = jnp.repeat(acts, episodes, axis=0)  # rows in (decision, episode) order, as obs
    net = ActorCritic(nvec=nvec, hidden=cfg.hidden)
    params = net.init(k_net, x[0])
    tx = optax.adam(cfg.lr * 10)

    @jax.jit
    def fit(params):
        loss_fn = lambda p: _nll(net.apply(p, x)[0], y, nvec, smoothing)

        def one(carry, _):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            upd, o = tx.update(g, o, p)
            return (optax.apply_updates(p, upd), o), loss

        (p, _), losses = jax.lax.scan(one, (params, tx.init(params)), None, epochs)
        return p, losses

    params, losses = fit(params)
    logits = net.apply(params, x)[0]
    pred = jnp.stack([jnp.argmax(h, -1) for h in _head_logits(logits, nvec)], -1)
    acc = float(jnp.mean(pred == y))
    return params, {"accuracy": acc, "loss": float(losses[-1]), "rows": int(D * episodes), "epochs": int(epochs)}


__all__ = ["SOURCES", "StaticStart", "clone_schedule", "schedule_actions", "static_schedule"]
