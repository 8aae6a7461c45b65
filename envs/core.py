"""Functional (gymnax 1.0 style) core of the quantized-diffusion environments.

``reset(key, params) -> (obs, state)`` and ``step(key, state, action, params) -> (obs, state, reward,
terminated, truncated, info)`` are pure, jittable and vmappable. ``EnvParams`` (a pytree) holds the
data: the per-layer cost table, the reward weights and the FP reference bank, so a sweep over lam /
alpha / budget or a swap of the bank never recompiles. The static parts (quantization engine,
reward mode, shapes) live on the core object.

Episode: one sampling trajectory of T = ``num_steps`` steps for B = ``images_per_env`` images whose
noise keys are drawn from the bank (without replacement) with the reset key. x_T is the bank's
initial noise, so the quantized and FP runs start identical (e_{-1} = 0).

Decisions
---------
* ``QuantDiffusionCore`` (``qpolicy/QuantDiffusion-v0``): one action per denoising step = choice
  indices for every layer: (L,) tied, (2L,) = [weights (L), activations (L)] when separate.
  Episode length T.
* ``QuantDiffusionLayerwiseCore`` (``qpolicy/QuantDiffusionLayerwise-v0``): one action per layer
  within each step: a scalar index tied, (2,) = [w, a] separate. The denoiser forward of step i runs
  once layer L-1 has its bits. Episode length T*L.

Reward (all modes; e, c as below)
---------------------------------
e_i = mean over the env's B images of min(err_b, error_clip), err_b = ||x̂_i - x_i||² / ||x_i||² after
sampler step i against the FP reference at the same step; e_{-1} = 0.
c = relative cost of one decision: per-step env c_i = step_cost(bits_i) / T = Σ_l table[l, w, a] / T;
layer-wise c_{i,l} = table[l, w, a] / T, with table[l, w, a] = MACs_l·b_w·b_a / BOPs_FP32 (one forward; with
env.cost "latency" the measured seconds of layer l at that pair over the FP32 model's, see qpolicy.latency),
so Σ c over an episode = CostModel.summary(bits)["cost_rel_fp32"] = C_total. C_k: cumulative cost after
decision k (C_0 = 0). Δe: e_i − e_{i−1} on a decision that runs step i's forward, 0 otherwise.

* ``delta``:    r = −(α·Δe + λ·c).                Return = −(α·e_final + λ·C_total).
* ``budget``:   r = −(α·Δe + λ·(max(0, C_k − β) − max(0, C_{k−1} − β)))   (β = budget; the penalty is
  charged by the decision that pushes the running cost above β, by the amount it goes above).
  Return = −(α·e_final + λ·max(0, C_total − β)).
* ``terminal``: r = 0 except on the episode's last decision: r = −(α·e_final + β_fd·fd_proxy + λ·C_total).

fd_proxy(x̂, x): :func:`qpolicy.metrics.fd_proxy`, a cheap distribution distance between the env's final
quantized and FP images (diagonal-Gaussian Fréchet distance of thumbnail features).

Spaces (gymnax style): ``action_space(params)``, ``observation_space(params)`` (:mod:`qpolicy.envs.spaces`).
Batched: ``reset_batch`` / ``step_batch`` (the one batched step the adapters, the JAX agents and the
evaluation use). Caches and shared compilation: :mod:`qpolicy.envs.registry`.

Observation (float32, flat; see :meth:`obs_spec`, built by :mod:`qpolicy.envs.observation`; never the FP
reference or the error)
------------------------------------------------------------------------------------------
==================  ============  ===================================================================
name                size          meaning
==================  ============  ===================================================================
step_frac           1             i / T (i = sampler steps done; 1 at the end)
t_frac              1             model timestep t_i / (num_train_timesteps - 1) of the next step
t_sin, t_cos        1, 1          sin(π·t_frac), cos(π·t_frac)
sqrt_abar           1             sqrt(ᾱ_{t_i}): the signal level of x_t (a sampler constant)
x_mean, x_std       1, 1          per-image mean / std of x_t, averaged over the env's images
x_absmax            1             per-image max |x_t|, averaged over the env's images
thumb[y,x,c]        s·s·C         s×s average pool of x_t (s = thumb_size), averaged over images
label[k], guidance  K + 1         conditional models only: the request (label one-hot, guidance scale
                                  / max scale; qpolicy.conditioning), averaged over images
(layer-wise only)
layer_frac          1             ℓ / L of the layer being decided
kind[k]             6             one-hot of the layer kind (dense, conv, conv_transpose,
                                  dense_general, einsum, custom)
log_macs            1             (log MACs_ℓ − min) / (max − min) over layers
log_params          1             (log params_ℓ − min) / (max − min) over layers
stage[s]            4             one-hot of the U-Net stage from the path: down, mid, up, other
cur_bits_{w,a}[l]   L or 2L       bits chosen so far this step, log2(b)/5; 0 = not chosen yet
(both)
prev_bits_{w,a}[l]  L or 2L       bits chosen at the previous step, log2(b)/5 (32 -> 1); 0 before step 0
cost                1             running cost C (units of the FP32 trajectory's BOPs)
==================  ============  ===================================================================
With tied bits only the ``w`` block is present (it stands for both).
"""
from __future__ import annotations

import collections
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.bits import to_bits
from qpolicy.engine import QuantEngine, relative_error
from qpolicy.metrics import fd_proxy

from .base import FunctionalEnv
from .config import REWARD_MODES, EnvConfig
from qpolicy.conditioning import request_features

from .observation import bits_feature, image_block, layer_features, obs_names
from .spaces import Box, Discrete, MultiDiscrete

#: EnvConfig fields that only enter EnvParams (data), never compiled code.
DATA_FIELDS = ("reward", "alpha", "lam", "budget", "beta_fd", "error_clip", "bank", "bank_size")


@flax.struct.dataclass
class EnvParams:
    """Data of an environment (a pytree: pass it into jitted code; changing it never recompiles).

    cost_table: (L, C, C) float32, relative cost of layer l for one forward at (w choice, a choice);
    Σ_l over the FP32 choice = 1. bit_choices: (C,) int32. reward_mode: int32 scalar, index into
    REWARD_MODES ("delta", "terminal", "budget"): data too, so one compile serves every mode. alpha, lam, budget, beta_fd, error_clip:
    float32 scalars (see module doc). bank_keys: (N,) image keys; bank_traj: (T+1, N, H, W, C) FP
    trajectories (bank_traj[0] = x_T)."""

    cost_table: jax.Array
    bit_choices: jax.Array
    reward_mode: jax.Array
    alpha: jax.Array
    lam: jax.Array
    budget: jax.Array
    beta_fd: jax.Array
    error_clip: jax.Array
    bank_keys: jax.Array
    bank_traj: jax.Array


@flax.struct.dataclass
class EnvState:
    """One env's state. x: (B, H, W, C) current quantized x; idx: (B,) bank indices; i: sampler steps
    done; layer: next layer to decide (0 for the per-step env); cur_w/cur_a: (L,) choice indices chosen
    this step (-1 = not yet); prev_w/prev_a: (L,) previous step's indices (-1 before step 0);
    error: e after the latest forward; error_sum: Σ e over done steps; cost: running cost C;
    bits_w_sum/bits_a_sum/n_bits: sums for the running mean bits."""

    x: jax.Array
    idx: jax.Array
    i: jax.Array
    layer: jax.Array
    cur_w: jax.Array
    cur_a: jax.Array
    prev_w: jax.Array
    prev_a: jax.Array
    error: jax.Array
    error_sum: jax.Array
    cost: jax.Array
    bits_w_sum: jax.Array
    bits_a_sum: jax.Array
    n_bits: jax.Array


class Compiled:
    """Jitted entry points of one core, shared by every core with the same static config (see
    :mod:`qpolicy.envs.registry`), plus the trace counts of its pure functions (a trace = a compilation)."""

    def __init__(self, core: "Environment"):
        self.trace_counts: collections.Counter = collections.Counter()
        self.reset = jax.jit(core.reset)
        self.step_env = jax.jit(core.step_env)
        self.reset_batch = jax.jit(core.reset_batch, static_argnums=2)
        self.step_batch = jax.jit(core.step_batch)
        self._core = core
        self._sharded: dict = {}

    def sharded(self, sharding: Any) -> tuple[Any, Any]:
        """(reset_batch, step_batch) with the signatures of ``jit_reset_batch`` / ``jit_step_batch``, jitted with
        the env axis 0 of inputs and outputs split over ``sharding``'s mesh (a
        :class:`qpolicy.sharding.EnvSharding`; params replicated). One pair per mesh, shared like the rest."""
        if sharding not in self._sharded:
            core, out = self._core, sharding.envs(0)  # every output is batched over the envs on axis 0
            self._sharded[sharding] = (
                jax.jit(lambda k, p, n: sharding.reset_batch(core, k, p, n), static_argnums=2, out_shardings=out),
                jax.jit(lambda k, s, a, p: sharding.step_batch(core, k, s, a, p), out_shardings=out))
        return self._sharded[sharding]


class Environment(FunctionalEnv):
    """gymnax-style functional core of the quantized-diffusion envs; see the module doc for the contracts.

    ``engine`` (static), ``config``; ``compiled``: the shared :class:`Compiled` functions (``jit_reset``,
    ``jit_step_env``, ``jit_reset_batch``, ``jit_step_batch``)."""

    layerwise: bool = False
    INFO_KEYS = ("error", "error_delta", "step_cost", "cost", "traj_error", "bits_w_mean", "bits_a_mean",
                 "fd_proxy", "step", "layer")

    def __init__(self, config: EnvConfig, engine: QuantEngine, compiled: Compiled | None = None):
        self.config = config
        self.engine = engine
        self.T, self.L = engine.num_steps, engine.num_layers
        self.C = len(engine.qcfg.bit_choices)
        self.B = config.images_per_env
        self.tied = config.tie_weights_activations
        self._log2_choices = jnp.asarray(np.log2(engine.qcfg.bit_choices) / 5.0, jnp.float32)
        self._layer_feats = jnp.asarray(layer_features(engine.den.layers), jnp.float32)
        smp = engine.sampler
        self._t_frac = jnp.asarray(np.asarray(smp.timesteps) / max(engine.den.schedule.num_timesteps - 1, 1),
                                   jnp.float32)
        self._sqrt_abar = jnp.sqrt(smp.abar)
        self.compiled = compiled if compiled is not None else Compiled(self)

    # ------------------------------------------------------------------ params
    def make_params(self, *, bank: str | None = None, bank_size: int | None = None, reference: Any = None,
                    **weights: float) -> EnvParams:
        """EnvParams from the config; override the bank ("train"/"eval"), its size, or reward weights
        (reward, alpha, lam, budget, beta_fd, error_clip) by keyword; ``reference``: a ReferenceBank to use as is
        (e.g. an eval bank on another noise seed)."""
        from qpolicy.banks import reference_bank

        cfg = self.config.replace(**{k: v for k, v in dict(bank=bank, bank_size=bank_size, **weights).items()
                                      if v is not None})
        rb = reference if reference is not None else reference_bank(self.engine, cfg.bank, cfg.bank_size)
        f = lambda v: jnp.asarray(v, jnp.float32)
        return EnvParams(cost_table=f(self.engine.cost_model().table()),
                         bit_choices=jnp.asarray(cfg.bit_choices, jnp.int32),
                         reward_mode=jnp.asarray(REWARD_MODES.index(cfg.reward), jnp.int32),
                         alpha=f(cfg.alpha), lam=f(cfg.lam), budget=f(cfg.budget), beta_fd=f(cfg.beta_fd),
                         error_clip=f(cfg.error_clip), bank_keys=rb.keys, bank_traj=rb.traj)

    @functools.cached_property
    def default_params(self) -> EnvParams:
        return self.make_params()

    # ------------------------------------------------------------------ spaces
    @property
    def episode_length(self) -> int:
        return self.T * self.L if self.layerwise else self.T

    def action_space(self, params: EnvParams | None = None) -> Discrete | MultiDiscrete:
        """The space of one decision's action (choice indices into ``bit_choices``)."""
        raise NotImplementedError

    def observation_space(self, params: EnvParams | None = None) -> Box:
        """Flat float32 observations of :meth:`obs_spec`'s layout."""
        return Box(-np.inf, np.inf, (self.obs_size,), jnp.float32)

    def obs_spec(self) -> list[str]:
        """Names of the observation's entries, in order (see the module doc table)."""
        cond = self.engine.den.conditioning
        return obs_names(image_channels=self.engine.image_shape[-1], thumb_size=self.config.thumb_size,
                         num_layers=self.L, tied=self.tied, layerwise=self.layerwise,
                         request_names=cond.feature_names() if cond is not None else ())

    @property
    def obs_size(self) -> int:
        return len(self.obs_spec())

    # ------------------------------------------------------------------ observation
    def get_obs(self, state: EnvState, params: EnvParams) -> jax.Array:
        """The flat float32 observation of ``state`` (layout: :meth:`obs_spec`)."""
        j = jnp.minimum(state.i, self.T - 1)
        tf = self._t_frac[j]
        time = jnp.stack([state.i / self.T, tf, jnp.sin(jnp.pi * tf), jnp.cos(jnp.pi * tf), self._sqrt_abar[j]])
        parts = [time, image_block(state.x, self.config.thumb_size)]
        if self.engine.den.conditioning is not None:  # what the sampler was asked for: deployable
            parts.append(request_features(self.engine.den.conditioning, params.bank_keys[state.idx]))
        if self.layerwise:
            parts.append(self._layer_feats[jnp.minimum(state.layer, self.L - 1)])
            parts.append(bits_feature(state.cur_w, self._log2_choices))
            if not self.tied:
                parts.append(bits_feature(state.cur_a, self._log2_choices))
        parts.append(bits_feature(state.prev_w, self._log2_choices))
        if not self.tied:
            parts.append(bits_feature(state.prev_a, self._log2_choices))
        parts.append(state.cost[None])
        return jnp.concatenate([p.astype(jnp.float32).reshape(-1) for p in parts])

    # ------------------------------------------------------------------ reset
    def reset(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Draw B bank images (without replacement) with ``key``; x = their x_T."""
        self.trace_counts["reset"] += 1
        N = params.bank_keys.shape[0]
        idx = jax.random.choice(key, N, (self.B,), replace=False).astype(jnp.int32)
        return self.reset_to(idx, params)

    def reset_to(self, idx: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Start an episode on the bank images ``idx`` (B,) (evaluation rolls fixed groups this way)."""
        neg = jnp.full((self.L,), -1, jnp.int32)
        z = jnp.zeros((), jnp.float32)
        state = EnvState(x=params.bank_traj[0, idx], idx=idx, i=jnp.zeros((), jnp.int32),
                         layer=jnp.zeros((), jnp.int32), cur_w=neg, cur_a=neg, prev_w=neg, prev_a=neg,
                         error=z, error_sum=z, cost=z, bits_w_sum=z, bits_a_sum=z, n_bits=jnp.zeros((), jnp.int32))
        return self.get_obs(state, params), state

    # ------------------------------------------------------------------ step pieces
    def _forward(self, state: EnvState, iw: jax.Array, ia: jax.Array, params: EnvParams):
        """Quantized sampler step i with (L,) choice indices; returns (x_next, e_i, x_ref_next)."""
        bw, ba = to_bits(iw, params.bit_choices), to_bits(ia, params.bit_choices)
        keys = params.bank_keys[state.idx]
        x = self.engine.step(state.x, state.i, keys, bw, ba)
        ref = params.bank_traj[state.i + 1, state.idx]
        e = jnp.mean(jnp.minimum(relative_error(x, ref), params.error_clip))
        return x, e, ref

    def _reward(self, e_prev, e_new, cost_prev, cost_new, c, last, fd, params: EnvParams) -> jax.Array:
        de = e_new - e_prev
        over = lambda C: jnp.maximum(0.0, C - params.budget)
        delta = -(params.alpha * de + params.lam * c)
        terminal = jnp.where(last, -(params.alpha * e_new + params.beta_fd * fd + params.lam * cost_new), 0.0)
        budget = -(params.alpha * de + params.lam * (over(cost_new) - over(cost_prev)))
        return jnp.stack([delta, terminal, budget])[params.reward_mode]

    def _split(self, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = jnp.asarray(action, jnp.int32).reshape(-1)
        a = jnp.clip(a, 0, self.C - 1)
        if self.tied:
            return a, a
        n = a.shape[0] // 2
        return a[:n], a[n:]

    def _accumulate(self, state: EnvState, iw: jax.Array, ia: jax.Array, c: jax.Array, params: EnvParams
                    ) -> dict[str, jax.Array]:
        """Running cost and bit sums after choosing indices iw, ia (any shape) at cost c."""
        return dict(cost=state.cost + c, n_bits=state.n_bits + iw.size,
                    bits_w_sum=state.bits_w_sum + to_bits(iw, params.bit_choices).sum().astype(jnp.float32),
                    bits_a_sum=state.bits_a_sum + to_bits(ia, params.bit_choices).sum().astype(jnp.float32))

    def _finish(self, state: EnvState, new: EnvState, c, e_prev, last, fd, params):
        reward = self._reward(e_prev, new.error, state.cost, new.cost, c, last, fd, params)
        steps_done = jnp.maximum(new.i, 1)
        info = {"error": new.error, "error_delta": new.error - e_prev, "step_cost": c, "cost": new.cost,
                "traj_error": new.error_sum / steps_done,
                "bits_w_mean": new.bits_w_sum / jnp.maximum(new.n_bits, 1),
                "bits_a_mean": new.bits_a_sum / jnp.maximum(new.n_bits, 1),
                "fd_proxy": fd, "step": new.i, "layer": new.layer}
        info = {k: jnp.asarray(v, jnp.int32 if k in ("step", "layer") else jnp.float32) for k, v in info.items()}
        terminated = jnp.asarray(last, bool)
        return self.get_obs(new, params), new, reward.astype(jnp.float32), terminated, jnp.zeros((), bool), info

    def _transition(self, state: EnvState, action: jax.Array, params: EnvParams, forward: bool | None):
        raise NotImplementedError

    # ------------------------------------------------------------------ public steps
    def step_env(self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams):
        """One decision without auto-reset -> (obs, state, reward, terminated, truncated, info).

        ``key`` is unused by the dynamics (sampler noise comes from the images' bank keys) and kept for the
        gymnax signature. ``terminated`` is True on the episode's last decision; ``truncated`` is always False."""
        self.trace_counts["step_env"] += 1
        return self._transition(state, action, params, None)

    # ------------------------------------------------------------------ batched (adapters, agents, evaluation)
    def step_batch_keys(self, keys: jax.Array, states: EnvState, actions: jax.Array, params: EnvParams):
        """Step n envs (per-env keys (n,)) (states/actions batched on axis 0) with SAME_STEP auto-reset.

        Returns (obs, states, reward, terminated, truncated, info, final_obs): obs/states of the new episode
        where an env finished; ``final_obs`` the observation the finished decision produced (equal to obs
        elsewhere). For the layer-wise env all envs of a batch must be in lockstep (same step and layer),
        which the adapters guarantee (fixed episode length, all envs reset together); the forward then runs
        only on decisions that complete a step."""
        if not self.layerwise:
            return super().step_batch_keys(keys, states, actions, params)
        self.trace_counts["step_batch"] += 1

        def one(forward):
            def f(k, s, a):
                return self.autoreset(k, *self._transition(s, a, params, forward), params)
            return jax.vmap(f)

        return jax.lax.cond(states.layer[0] == self.L - 1, one(True), one(False), keys, states, actions)

    @property
    def trace_counts(self) -> collections.Counter:  # type: ignore[override]
        """Traces of each public pure function, shared with the cores that share :attr:`compiled`."""
        return self.compiled.trace_counts

    @property
    def jit_reset(self):
        return self.compiled.reset

    @property
    def jit_step_env(self):
        return self.compiled.step_env

    @property
    def jit_reset_batch(self):
        return self.compiled.reset_batch

    @property
    def jit_step_batch(self):
        return self.compiled.step_batch


class QuantDiffusionCore(Environment):
    """Per-step decisions (``qpolicy/QuantDiffusion-v0``): action = (L,) tied or (2L,) [w | a] choice indices."""

    layerwise = False

    def action_space(self, params: EnvParams | None = None) -> MultiDiscrete:
        return MultiDiscrete((self.C,) * (self.L if self.tied else 2 * self.L))

    def _transition(self, state, action, params, forward):
        iw, ia = self._split(action)
        x, e, ref = self._forward(state, iw, ia, params)
        c = jnp.sum(params.cost_table[jnp.arange(self.L), iw, ia]) / self.T
        i = state.i + 1
        new = state.replace(x=x, i=i, prev_w=iw, prev_a=ia, error=e, error_sum=state.error_sum + e,
                            **self._accumulate(state, iw, ia, c, params))
        last = i >= self.T
        return self._finish(state, new, c, state.error, last, fd_proxy(x, ref, self.config.thumb_size), params)


class QuantDiffusionLayerwiseCore(Environment):
    """Layer-wise decisions (``qpolicy/QuantDiffusionLayerwise-v0``): action = a choice index (tied) or
    (2,) [w, a]; the forward of step i runs on the decision for layer L-1."""

    layerwise = True

    def action_space(self, params: EnvParams | None = None) -> Discrete | MultiDiscrete:
        return Discrete(self.C) if self.tied else MultiDiscrete((self.C, self.C))

    def _transition(self, state, action, params, forward):
        if forward is None:  # unbatched: branch on the traced layer counter (a select under vmap)
            return jax.lax.cond(state.layer == self.L - 1,
                                lambda s, a: self._transition(s, a, params, True),
                                lambda s, a: self._transition(s, a, params, False), state, action)
        iw1, ia1 = self._split(action)
        iw, ia = iw1[0], ia1[0]
        l = state.layer
        cur_w, cur_a = state.cur_w.at[l].set(iw), state.cur_a.at[l].set(ia)
        c = params.cost_table[l, iw, ia] / self.T
        common = self._accumulate(state, iw, ia, c, params)
        if forward:
            x, e, ref = self._forward(state, cur_w, cur_a, params)
            neg = jnp.full((self.L,), -1, jnp.int32)
            new = state.replace(x=x, i=state.i + 1, layer=jnp.zeros((), jnp.int32), cur_w=neg, cur_a=neg,
                                prev_w=cur_w, prev_a=cur_a, error=e, error_sum=state.error_sum + e, **common)
            last = new.i >= self.T
        else:
            ref = params.bank_traj[state.i, state.idx]
            new = state.replace(layer=l + 1, cur_w=cur_w, cur_a=cur_a, **common)
            last = jnp.zeros((), bool)
        fd = fd_proxy(new.x, ref, self.config.thumb_size)
        return self._finish(state, new, c, state.error, last, fd, params)
