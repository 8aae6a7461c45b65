"""PPOConfig: the hyper-parameters of JAX PPO (:mod:`qpolicy.agents.ppo_jax`), validated on construction, with
their dict form (saved with a policy, :mod:`qpolicy.agents.ppo_checkpoint`)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Sequence

from qpolicy.config import check, is_int


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO hyper-parameters.

    num_envs: parallel envs (vmapped core).
    num_steps: rollout length per env per update.
    total_timesteps: env decisions per seed; num_updates = total_timesteps // (num_envs * num_steps).
    update_epochs: passes over each rollout batch.
    num_minibatches: minibatches per pass (must divide num_envs * num_steps).
    lr: Adam step size.
    anneal_lr: anneal lr linearly to 0 over the run.
    gamma: discount.
    gae_lambda: GAE λ.
    clip_eps: PPO ratio clip (also the value clip).
    ent_coef: entropy bonus weight.
    vf_coef: value-loss weight.
    max_grad_norm: global-norm gradient clip (inf disables it).
    hidden: MLP widths of the actor and critic torsos (separate networks, tanh).
    seed: base seed.
    num_seeds: independent seeds trained together (vmapped) from jax.random.split(key(seed), num_seeds).
    cost_target: None (the env's cost weight lam stays fixed) or the target of the *mean* episode cost over the
        rollout batch (env info "cost", BOPs / FP32 BOPs of the trajectory; 0.0625 = uniform W8A8): a Lagrangian
        PPO whose dual variable lam (the env's cost weight, carried per seed) follows
        log lam += dual_lr * (mean cost / cost_target - 1) after every update, so the policy may spend more bits on
        inputs where they buy more error, as long as the batch mean meets the target. Needs env params with a
        ``lam`` field (the quantized-diffusion envs; reward "delta" or "terminal").
    dual_lr: step of log lam per update, per unit of relative constraint violation (cost_target only).
    warm_start: None, "ilp" (the sensitivity ILP on the train bank at cost_target, else env.budget) or a schedule
        file: the actor starts by playing that static schedule (behaviour cloning, :mod:`qpolicy.agents.warm_start`;
        applied by ``qpolicy train``, its search compute charged to the learned policy).
    warm_start_epochs: full-batch Adam steps of the behaviour cloning.
    warm_start_smoothing: label smoothing of the cloning targets (keeps PPO exploring around the schedule).
    devices: local devices the env batch is split over (qpolicy.sharding): None = all of them when they divide
        num_envs, else one; an integer n = exactly n (must divide num_envs). Results do not depend on it (up to
        the order of floating-point sums).
    """

    num_envs: int = 16
    num_steps: int = 32
    total_timesteps: int = 20_000
    update_epochs: int = 4
    num_minibatches: int = 4
    lr: float = 3e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: tuple[int, ...] = (128, 128)
    seed: int = 0
    num_seeds: int = 1
    cost_target: float | None = None
    dual_lr: float = 0.1
    warm_start: str | None = None
    warm_start_epochs: int = 300
    warm_start_smoothing: float = 0.1
    devices: int | None = None

    def __post_init__(self) -> None:
        put = lambda name, **rule: object.__setattr__(self, name, check(name, getattr(self, name), **rule))
        for name in ("num_envs", "num_steps", "total_timesteps", "update_epochs", "num_minibatches", "num_seeds"):
            put(name, kind="int", lo=1)
        put("seed", kind="int", lo=0)
        put("devices", kind="int", lo=1, optional=True)
        put("anneal_lr", kind="bool")
        for name in ("lr", "clip_eps", "dual_lr"):
            put(name, kind="real", lo=0, lo_open=True)
        if self.cost_target is not None:
            put("cost_target", kind="real", lo=0, lo_open=True)
        put("warm_start_epochs", kind="int", lo=1)
        put("warm_start_smoothing", kind="real", lo=0, hi=1, hi_open=True)
        if self.warm_start is not None and (not isinstance(self.warm_start, str) or not self.warm_start):
            raise ValueError(f"warm_start must be None, 'ilp' or a schedule file path, got {self.warm_start!r}")
        for name in ("gamma", "gae_lambda"):
            put(name, kind="real", lo=0, hi=1)
        for name in ("ent_coef", "vf_coef"):
            put(name, kind="real", lo=0)
        put("max_grad_norm", kind="real", lo=0, lo_open=True, hi=math.inf)  # inf disables clipping
        hidden = self.hidden
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) or not hidden or \
                not all(is_int(h) and h >= 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of integers >= 1 (e.g. (128, 128)), got {hidden!r}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        if self.batch_size % self.num_minibatches:
            divisors = [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]
            raise ValueError(f"num_minibatches ({self.num_minibatches}) must divide the rollout batch "
                             f"num_envs * num_steps = {self.batch_size}; accepted: {divisors}")
        if self.total_timesteps < self.batch_size:
            raise ValueError(f"total_timesteps ({self.total_timesteps}) must be >= num_envs * num_steps "
                             f"= {self.batch_size} (one update)")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    def replace(self, **kw: Any) -> "PPOConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "PPOConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown PPOConfig field(s) {unknown}; accepted: {sorted(fields)}")
        d = dict(d)
        if "hidden" in d and isinstance(d["hidden"], list):
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)
