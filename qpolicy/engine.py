"""The quantized sampler: a denoiser with traced per-layer bits, run step by step or over a schedule.

Shapes: S sampler steps, L quantizable layers, B images, image (H, W, C).
``bits_w`` / ``bits_a`` are int32 arrays, (L,) for one step or (S, L) for a schedule; they are
traced data, so one compiled function serves every schedule. 32 means float passthrough.

Errors follow DESIGN: e_i = ||x_hat_i - x_i||^2 / ||x_i||^2 per image after step i (x_i the FP
trajectory from the same initial noise and the same sampler noise); ``final_error`` is e at the
last step (the sample x_0); ``traj_error`` is the mean of e over steps.
Reference banks live in :mod:`qpolicy.banks`, calibration in :mod:`qpolicy.ptq`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .banks import ReferenceBank
from .bits import DEFAULT_BIT_CHOICES, check_bits, check_choices, to_index
from .cost import CostModel
from .denoiser import Denoiser
from .diffusion import Sampler, image_noise, make_sampler, sampler_step
from .layers import activation_interceptor, map_layer_weights
from .ptq import static_act_ranges
from .quant import ACT_DEFAULT, ACT_RANGE_MODES, WEIGHT_DEFAULT, QuantSpec, fake_quant


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How layers are quantized (static, compile-time): quantizer families, activation-range mode, choices.

    w_spec: weight quantizer (default: symmetric, per output channel).
    a_spec: activation quantizer (default: asymmetric, per tensor).
    act_ranges: "dynamic" (min/max of each image's tensor at each call: per sample, so results do not depend
        on batching) or "static" (calibrated per (layer, step bucket) from FP trajectories).
    range_buckets: step buckets of the static ranges.
    bit_choices: accepted bitwidths (the rule of :func:`qpolicy.bits.check_choices`).
    precompute_weights: quantize each layer's weights once per choice and gather at run time (bits must be
        choices) instead of per call (the default, which keeps the STE gradient and measured faster on the
        H100: benchmarks/results/*precomputed_weights.json)."""

    w_spec: QuantSpec = WEIGHT_DEFAULT
    a_spec: QuantSpec = ACT_DEFAULT
    act_ranges: str = "dynamic"
    range_buckets: int = 4
    bit_choices: tuple[int, ...] = DEFAULT_BIT_CHOICES
    precompute_weights: bool = False

    def __post_init__(self) -> None:
        if self.act_ranges not in ACT_RANGE_MODES:
            raise ValueError(f"act_ranges must be one of {ACT_RANGE_MODES}, got {self.act_ranges!r}")
        if self.range_buckets < 1:
            raise ValueError(f"range_buckets must be >= 1, got {self.range_buckets}")
        object.__setattr__(self, "bit_choices", check_choices(self.bit_choices))

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dataclasses.asdict(self.w_spec), "activations": dataclasses.asdict(self.a_spec),
                "act_ranges": self.act_ranges, "range_buckets": self.range_buckets,
                "bit_choices": list(self.bit_choices)}


@dataclasses.dataclass(frozen=True, eq=False)
class QuantEngine:
    """A denoiser + sampler + quantizer config: pure functions for quantized sampling steps.

    act_ranges_table: (range_buckets, L, 2) static activation (min, max) per (step bucket, layer),
    required when ``qcfg.act_ranges == "static"`` (see :func:`calibrate`)."""

    den: Denoiser
    sampler: Sampler
    qcfg: QuantConfig = QuantConfig()
    act_ranges_table: jax.Array | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_table", self._build_weight_table() if self.qcfg.precompute_weights else None)
        if self.qcfg.act_ranges == "static":
            L = len(self.den.layers)
            if self.act_ranges_table is None:
                raise ValueError("act_ranges='static' needs a calibrated table: use qpolicy.engine.make_engine(...)")
            if tuple(self.act_ranges_table.shape) != (self.qcfg.range_buckets, L, 2):
                raise ValueError(f"act_ranges_table must be (range_buckets, L, 2) = {(self.qcfg.range_buckets, L, 2)}, "
                                 f"got {tuple(self.act_ranges_table.shape)}")

    @property
    def num_layers(self) -> int:
        return len(self.den.layers)

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.den.image_shape

    def cost_model(self, latency: Any = None) -> CostModel:
        return CostModel.from_layers(self.den.layers, self.qcfg.bit_choices, latency)

    def bucket(self, i: jax.Array) -> jax.Array:
        return (i * self.qcfg.range_buckets) // self.num_steps

    def _build_weight_table(self) -> Any:
        """Params tree whose layer weights are stacks (C, *w.shape): the weights fake-quantized once at
        every bit choice, so a forward only gathers (no per-call, per-env re-quantization). Built eagerly
        in __post_init__ so it is concrete even when the engine is first used inside a trace."""
        choices = jnp.asarray(self.qcfg.bit_choices, jnp.int32)
        q = jax.jit(lambda p: map_layer_weights(p, self.den.layers, lambda l, w: jax.vmap(
            lambda b: fake_quant(w, b, self.qcfg.w_spec))(choices)))
        return jax.block_until_ready(q(self.den.params))

    def quantize_params(self, bits_w: jax.Array) -> Any:
        """The params collection with each layer's weights fake-quantized at bits_w[l] (bits_w: (L,)).

        With ``qcfg.precompute_weights`` the weights come from ``weight_table`` (bits must
        be in ``bit_choices``, which every public entry point checks); by default they are quantized here,
        which keeps the straight-through gradient to the float weights (QAT)."""
        if not self.qcfg.precompute_weights:
            return map_layer_weights(self.den.params, self.den.layers,
                                     lambda l, w: fake_quant(w, bits_w[l], self.qcfg.w_spec))
        idx = to_index(bits_w, self.qcfg.bit_choices)
        return map_layer_weights(self.weight_table, self.den.layers, lambda l, stack: stack[idx[l]])

    def eps(self, x: jax.Array, i: jax.Array, bits_w: jax.Array, bits_a: jax.Array) -> jax.Array:
        """Quantized eps at sampler step i for x (B, H, W, C), with (L,) bits."""
        t = jnp.full((x.shape[0],), self.sampler.timesteps[i], jnp.int32)
        if self.qcfg.act_ranges == "static":
            table = self.act_ranges_table[self.bucket(i)]
            if self.qcfg.a_spec.symmetric:
                fn = lambda l, a: fake_quant(a, bits_a[l], self.qcfg.a_spec, absmax=table[l, 1])
            else:
                fn = lambda l, a: fake_quant(a, bits_a[l], self.qcfg.a_spec, minmax=(table[l, 0], table[l, 1]))
        else:  # dynamic ranges per image, so one image's error never depends on its batch-mates
            fn = lambda l, a: jax.vmap(lambda v: fake_quant(v, bits_a[l], self.qcfg.a_spec))(a)
        with nn.intercept_methods(activation_interceptor(self.den.layers, fn)):
            return self.den.apply(self.quantize_params(bits_w), x, t)

    def step(self, x: jax.Array, i: jax.Array, keys: jax.Array, bits_w: jax.Array, bits_a: jax.Array) -> jax.Array:
        """One quantized reverse step x_i -> x_{i+1} (B images, per-image keys (B,))."""
        return sampler_step(self.sampler, x, self.eps(x, i, bits_w, bits_a), i, keys)

    def fp_step(self, x: jax.Array, i: jax.Array, keys: jax.Array) -> jax.Array:
        t = jnp.full((x.shape[0],), self.sampler.timesteps[i], jnp.int32)
        return sampler_step(self.sampler, x, self.den(x, t), i, keys)

    def initial(self, keys: jax.Array) -> jax.Array:
        return image_noise(keys, 0, self.image_shape)

    def trajectory(self, keys: jax.Array, bits_w: jax.Array, bits_a: jax.Array) -> jax.Array:
        """Quantized trajectory (S+1, B, H, W, C): x_T then x after each step, under (S, L) bits."""
        def body(x, inp):
            i, bw, ba = inp
            x = self.step(x, i, keys, bw, ba)
            return x, x

        x0 = self.initial(keys)
        _, traj = jax.lax.scan(body, x0, (jnp.arange(self.num_steps), bits_w, bits_a))
        return jnp.concatenate([x0[None], traj])

    @functools.cached_property
    def errors_fn(self):
        """Jitted :func:`schedule_errors` for this engine (bits are arguments: one compile serves all)."""
        return jax.jit(lambda keys, ref, bw, ba: schedule_errors(self, keys, ref, bw, ba))

    def fp_trajectory(self, keys: jax.Array) -> jax.Array:
        """Full-precision trajectory (S+1, B, H, W, C) (x_T first)."""
        def body(x, i):
            x = self.fp_step(x, i, keys)
            return x, x

        x0 = self.initial(keys)
        _, traj = jax.lax.scan(body, x0, jnp.arange(self.num_steps))
        return jnp.concatenate([x0[None], traj])


def relative_error(x_hat: jax.Array, x: jax.Array) -> jax.Array:
    """||x_hat - x||^2 / ||x||^2 per image over the trailing (H, W, C) axes."""
    axes = tuple(range(x.ndim - 3, x.ndim))
    return jnp.sum((x_hat - x) ** 2, axes) / jnp.maximum(jnp.sum(x**2, axes), 1e-12)


def make_engine(den: Denoiser, *, steps: int = 10, sampler: str = "ddim", eta: float = 0.0,
                qcfg: QuantConfig | None = None, calib_n: int = 32) -> QuantEngine:
    """Build a :class:`QuantEngine`. Static activation ranges come from the table stored with the model
    (``qpolicy calibrate``) if there is one for this sampler, else from the on-disk cache, else they are
    calibrated now (and cached)."""
    qcfg = qcfg or QuantConfig()
    if qcfg.range_buckets > steps:  # a bucket per step at most: empty buckets have no range
        qcfg = dataclasses.replace(qcfg, range_buckets=steps)
    smp = make_sampler(den.schedule, sampler, steps, eta=eta)
    table = static_act_ranges(den, smp, qcfg, calib_n) if qcfg.act_ranges == "static" else None
    return QuantEngine(den=den, sampler=smp, qcfg=qcfg, act_ranges_table=table)


def schedule_errors(engine: QuantEngine, keys: jax.Array, ref_traj: jax.Array, bits_w: jax.Array,
                    bits_a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-step errors (S, B) of the quantized run vs ``ref_traj`` (S+1, B, ...) and the final samples."""
    traj = engine.trajectory(keys, bits_w, bits_a)
    return relative_error(traj[1:], ref_traj[1:]), traj[-1]


def evaluate_schedule(engine: QuantEngine, bank: ReferenceBank, bits_w: Any, bits_a: Any, *,
                      batch_size: int = 256, with_fd: bool = False, cost: CostModel | None = None
                      ) -> dict[str, Any]:
    """Run a static (S, L) schedule on every image of ``bank``.

    Returns cost summary (see CostModel.summary) plus per_step_error (S,), traj_error, final_error
    (means over images), errors (S, N) numpy (per step and image), samples (N, H, W, C) numpy, and fd (+ fd_fp:
    the FP samples' fd) if with_fd."""
    S, L = engine.num_steps, engine.num_layers
    bw = jnp.asarray(check_bits(bits_w, engine.qcfg.bit_choices, field="bits_w", shape=(S, L)))
    ba = jnp.asarray(check_bits(bits_a, engine.qcfg.bit_choices, field="bits_a", shape=(S, L)))
    run = engine.errors_fn
    errs, samples = [], []
    for s in range(0, bank.size, batch_size):
        e, x = run(bank.keys[s:s + batch_size], bank.traj[:, s:s + batch_size], bw, ba)
        errs.append(np.asarray(e))
        samples.append(np.asarray(x))
    e = np.concatenate(errs, axis=1)  # (S, N)
    out = {**(cost or engine.cost_model()).summary(np.asarray(bw), np.asarray(ba)),
           "per_step_error": e.mean(1).tolist(), "traj_error": float(e.mean()), "final_error": float(e[-1].mean()),
           "n": bank.size, "steps": S, "errors": e, "samples": np.concatenate(samples)}
    if with_fd and engine.den.dataset:
        from .metrics import sample_quality

        out["fd"] = sample_quality(out["samples"], engine.den.dataset)["fd"]
        out["fd_fp"] = sample_quality(np.asarray(bank.traj[-1]), engine.den.dataset)["fd"]
    return out


def uniform_bits(engine: QuantEngine, w: int, a: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, L) schedules with every entry w (weights) and a (activations)."""
    shape = (engine.num_steps, engine.num_layers)
    return np.full(shape, w, np.int32), np.full(shape, a, np.int32)
