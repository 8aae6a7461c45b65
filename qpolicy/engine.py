"""The quantized sampler: a denoiser with traced per-layer bits, run step by step or over a schedule.

Shapes: S sampler steps, L quantizable layers, B images, image (H, W, C).
``bits_w`` / ``bits_a`` are int32 arrays, (L,) for one step or (S, L) for a schedule; they are
traced data, so one compiled function serves every schedule. 32 means float passthrough.

Errors follow DESIGN: e_i = ||x_hat_i - x_i||^2 / ||x_i||^2 per image after step i (x_i the FP
trajectory from the same initial noise and the same sampler noise); ``final_error`` is e at the
last step (the sample x_0); ``traj_error`` is the mean of e over steps.
Reference banks live in :mod:`qpolicy.banks`, calibration in :mod:`qpolicy.ptq`, QuantConfig and its presets in
:mod:`qpolicy.quant_config`, schedules run over banks in :mod:`qpolicy.schedule_eval` (both re-exported here).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .batched_conv import BATCHED_CONV_IMPLS, conv_interceptor
from .bits import to_index
from .cost import CostModel
from .denoiser import Denoiser
from .diffusion import Sampler, image_noise, make_sampler, sampler_step
from .layers import activation_interceptor, layer_params, map_layer_weights
from .ptq import (CLIP_GRID, act_base_range, act_clip_ratios, bias_correctable, cached_arrays, input_means,
                  input_splits, quant_act, smooth_scales, static_act_ranges, weight_clip_ratios)
from .quant import compute_scale, fake_quant, qrange, range_from
# Re-exported, so qpolicy.engine stays the one import of these names: QuantConfig and its presets
# (quant_config.py), the schedule evaluation helpers (schedule_eval.py).
from .quant_config import (ATTN_MATMULS, CLIP_OBJECTIVES, DEFAULT_PRESET, OUTPUT_CLIP_MAX_BITS,  # noqa: F401
                           PTQ_FIELDS, PTQ_PARAMS, QUANT_PRESETS, RECON_METHODS, QuantConfig, quant_config,
                           quant_config_from_block)
from .schedule_eval import (auto_chunk, evaluate_schedule, grouped_errors, relative_error,  # noqa: F401
                            schedule_errors, uniform_bits)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantEngine:
    """A denoiser + sampler + quantizer config: pure functions for quantized sampling steps.

    act_ranges_table: (range_buckets, L, 2) static activation (min, max) per (step bucket, layer),
    required when ``qcfg.act_ranges == "static"`` (see :func:`calibrate`).
    latency: optional (L, C, C) measured seconds per image (:mod:`qpolicy.latency`); when set, the engine's
    :meth:`cost_model` (reward, budgets, baselines, summaries) costs schedules by it instead of BOPs.
    batched_conv: how a convolution runs when vmapped over envs with per-env (quantized) kernels: "xla" (JAX's
    rule, a grouped convolution), "im2col" (a batched GEMM) or "map" (a loop of plain convolutions), see
    :mod:`qpolicy.batched_conv`; the same numbers up to float rounding, unbatched calls are unaffected.
    Derived at construction (concrete, so the engine can first be used inside a trace): ``input_splits``
    ({layer: channel sizes} with split_concat), ``input_means`` ({layer: (S, Cin)} with bias_correction),
    ``weight_table`` (with precompute_weights)."""

    den: Denoiser
    sampler: Sampler
    qcfg: QuantConfig = QuantConfig()
    act_ranges_table: jax.Array | None = None
    latency: Any = None
    batched_conv: str = "xla"

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass, derived fields)
        if self.batched_conv not in BATCHED_CONV_IMPLS:
            raise ValueError(f"batched_conv must be one of {BATCHED_CONV_IMPLS}, got {self.batched_conv!r}")
        put("input_splits", input_splits(self.den) if self.qcfg.split_concat else {})
        put("input_means", input_means(self.den, self.sampler, n=self.qcfg.calib_n) if self.qcfg.bias_correction
            else {})
        put("smooth", self._calibrated("smooth", lambda: smooth_scales(self.den, self.sampler, self.qcfg,
                                                                       n=self.qcfg.calib_n))
            if self.qcfg.smoothquant else {})
        put("act_ratios", self._calibrated("act_clip", lambda: act_clip_ratios(
            self.den, self.sampler, self.qcfg, self.input_splits, self.smooth,
            per_image=self.qcfg.act_ranges == "dynamic", n=self.qcfg.calib_n)) if self.qcfg.act_clip == "mse" else {})
        put("clip_ratios", self._clip_ratios() if self.qcfg.weight_clipping else {})
        put("recon", self._calibrated("recon", self._reconstruct) if self.qcfg.reconstruction else {})
        put("bias_deltas", self._bias_deltas())
        put("weight_table", self._build_weight_table() if self.qcfg.precompute_weights else None)
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
        """The engine's one :class:`CostModel`: BOPs, or the measured (L, C, C) latency table the engine carries
        (``with_latency``; ``latency`` overrides it)."""
        return CostModel.from_layers(self.den.layers, self.qcfg.bit_choices,
                                     self.latency if latency is None else latency)

    def _copy_with(self, **fields: Any) -> "QuantEngine":
        """A shallow copy with ``fields`` replaced (the calibration products are shared, not redone)."""
        import copy

        eng = copy.copy(self)
        for k, v in fields.items():
            object.__setattr__(eng, k, v)
        return eng

    def with_batched_conv(self, impl: str) -> "QuantEngine":
        """This engine with another ``batched_conv`` implementation (a shallow copy: calibration is not redone)."""
        if impl not in BATCHED_CONV_IMPLS:
            raise ValueError(f"batched_conv must be one of {BATCHED_CONV_IMPLS}, got {impl!r}")
        return self._copy_with(batched_conv=impl)

    def with_latency(self, latency: Any) -> "QuantEngine":
        """This engine with a measured (L, C, C) latency table (seconds per image on ``qcfg.bit_choices``, see
        :mod:`qpolicy.latency`) as its cost: a shallow copy, so calibration is not redone."""
        CostModel.from_layers(self.den.layers, self.qcfg.bit_choices, latency)  # validates the shape
        return self._copy_with(latency=np.asarray(latency, np.float64))

    def bucket(self, i: jax.Array) -> jax.Array:
        return (i * self.qcfg.range_buckets) // self.num_steps

    def _build_weight_table(self) -> Any:
        """Params tree whose layer weights are stacks (C, *w.shape): the weights fake-quantized once at
        every bit choice, so a forward only gathers (no per-call, per-env re-quantization). Built eagerly
        in __post_init__ so it is concrete even when the engine is first used inside a trace."""
        choices = jnp.asarray(self.qcfg.bit_choices, jnp.int32)
        q = jax.jit(lambda p: map_layer_weights(p, self.den.layers, lambda l, w, name: jax.vmap(
            lambda b: self.quantize_weight(l, w, b, name))(choices), named=True))
        return jax.block_until_ready(q(self.den.params))

    def _bias_deltas(self) -> dict[int, jax.Array]:
        """{layer: (S, C, Cout)} bias correction E[a]_i · (Q_c(W) − W) (summed over kernel positions) for every sampler
        step i and bit choice c, precomputed so a forward only gathers it."""
        choices = jnp.asarray(self.qcfg.bit_choices, jnp.int32)
        out = {}
        for l, mean in self.input_means.items():
            node = layer_params(self.den.params, self.den.layers[l])
            w = jnp.asarray(node["kernel"], jnp.float32)
            dw = jax.jit(jax.vmap(lambda b: (self.quantize_weight(l, w, b) - w).reshape(-1, w.shape[-2],
                                                                                        w.shape[-1]).sum(0)))(choices)
            out[l] = jnp.einsum("si,cio->sco", mean, dw)
        return out

    def weight_parts(self, l: int, w: Any) -> tuple[int, ...] | None:
        """Input-channel sizes of layer l's weight slices (None: quantized whole)."""
        sizes = self.input_splits.get(l)
        return sizes if sizes and w.ndim >= 2 and w.shape[-2] == sum(sizes) else None

    def _calibrated(self, kind: str, compute: Callable[[], dict[int, jax.Array]]) -> dict[int, jax.Array]:
        """A per-layer calibration product {l: array}, cached on disk (key: the quantizer config, sampler, calibration
        images, and the splits, smoothing scales and clipping ratios in use)."""
        clip_tag = _tag(getattr(self, "clip_ratios", {}))  # what reconstruction rounds on
        key = (kind, self.qcfg.to_dict(), self.sampler.kind, self.num_steps, float(getattr(self.sampler, "eta", 0.0)),
               sorted(self.input_splits.items()), self._smooth_tag(), clip_tag, self.den.layer_hash)
        out = cached_arrays(kind, self.den, key, lambda: {(l,): v for l, v in compute().items()})
        return {k[0]: v for k, v in out.items()}

    def _reconstruct(self) -> dict[int, jax.Array]:
        """AdaRound weights {l: (len(recon_bits), *kernel shape)} of every conv / dense layer with a 2-D or 4-D
        kernel (symmetric tensor / channel weight specs)."""
        from .reconstruct import reconstruct_weights

        spec = self.qcfg.w_spec
        if not spec.symmetric or spec.log2 or spec.granularity == "group":
            return {}
        layers = [l for l in bias_correctable(self.den, need_bias=False) if len(self.den.layers[l].weight_shape)
                  in (2, 4)]
        return reconstruct_weights(self.den, self.sampler, layers, self.weight_grid, self.qcfg.recon_bits,
                                   n=self.qcfg.calib_n, iters=self.qcfg.recon_iters, method=self.qcfg.recon_method,
                                   center=self.qcfg.bias_correction)

    def weight_grid(self, l: int, bits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(step per kernel entry (kernel shape, in the kernel's basis), qmin, qmax) of layer l's kernel quantizer at
        ``bits``: per slice and output channel, clipped range, SmoothQuant's step on s·W divided by s."""
        w = jnp.asarray(layer_params(self.den.params, self.den.layers[l])["kernel"], jnp.float32)
        ws = self.smoothed(l, w, bits)
        sizes = self.weight_parts(l, w)
        parts = jnp.split(ws, np.cumsum(sizes)[:-1].tolist(), axis=-2) if sizes else [ws]
        scales = [jnp.broadcast_to(compute_scale(p, bits, self.qcfg.w_spec,
                                                 absmax=self.weight_absmax(l, "kernel", j, p, bits))[0], p.shape)
                  for j, p in enumerate(parts)]
        scale = jnp.concatenate(scales, axis=-2)
        if l in self.smooth:
            scale = scale / self.smooth_scale(l, bits)[:, None]
        qmin, qmax = qrange(bits, True)
        return scale, qmin.astype(jnp.float32), qmax.astype(jnp.float32)

    def _smooth_tag(self) -> str:
        smooth = getattr(self, "smooth", {})
        return hashlib.sha256(b"".join(np.asarray(smooth[l]).tobytes() for l in sorted(smooth))).hexdigest()[:12]

    def _clip_ratios(self) -> dict[tuple[int, str, int], jax.Array]:
        """{(layer, weight name, part): (C, *scale shape) MSE-optimal clipping ratios} (symmetric tensor/channel
        weight specs; other specs are not clipped), searched on the smoothed weights s·W with smoothquant."""
        spec = self.qcfg.w_spec
        if not spec.symmetric or spec.log2 or spec.granularity == "group":
            return {}

        def compute():
            out = {}
            for lay in self.den.layers:
                node = layer_params(self.den.params, lay)
                for name in lay.weight_names:
                    w = jnp.asarray(node[name], jnp.float32)
                    sizes = self.weight_parts(lay.index, w)
                    split = lambda v: jnp.split(v, np.cumsum(sizes)[:-1].tolist(), axis=-2) if sizes else [v]  # noqa
                    full = self.smoothed(lay.index, w, jnp.int32(32), name)  # s·W (smoothed layers)
                    for j, (p, ps) in enumerate(zip(split(w), split(full))):
                        r = weight_clip_ratios(p, spec, self.qcfg.bit_choices)
                        if ps is not p:  # the choices at which the layer is smoothed are searched on s·W
                            on = jnp.asarray([c >= self.qcfg.smooth_min_bits for c in self.qcfg.bit_choices])
                            r = jnp.where(on.reshape((-1,) + (1,) * (r.ndim - 1)),
                                          weight_clip_ratios(ps, spec, self.qcfg.bit_choices), r)
                        out[(lay.index, name, j)] = r
            return out

        ratios = cached_arrays("clip", self.den, (spec, self.qcfg.bit_choices, CLIP_GRID,
                                                  sorted(self.input_splits.items()), self.den.layer_hash,
                                                  self._smooth_tag(), self.qcfg.smooth_min_bits), compute)
        return {**ratios, **self._output_clip_ratios(ratios)} if self.qcfg.clip_objective == "output" else ratios

    def _output_clip_ratios(self, init: dict[tuple[int, str, int], jax.Array]) -> dict[tuple[int, str, int], jax.Array]:
        """Output-aware clipping ratios {(layer, "kernel", part): (C, *scale shape)} of every conv / dense layer with a
        2-D or 4-D kernel: at each bit choice <= OUTPUT_CLIP_MAX_BITS, per output channel, the ratio of CLIP_GRID
        minimising the layer's output error on its FP calibration inputs
        (:func:`qpolicy.reconstruct.output_clip_ratios`),
        searched from the weight-MSE ratios ``init`` (other choices keep them). Cached on disk with everything it
        depends on (config, sampler, calibration images, splits, SmoothQuant scales, the initial ratios)."""
        from .reconstruct import layer_grams, output_clip_ratios

        layers = [l for l in bias_correctable(self.den, need_bias=False)
                  if len(self.den.layers[l].weight_shape) in (2, 4) and (l, "kernel", 0) in init]
        idx = np.asarray([c for c, b in enumerate(self.qcfg.bit_choices) if b <= OUTPUT_CLIP_MAX_BITS], np.int32)
        if not layers or not idx.size:
            return {}

        def compute():
            grams = layer_grams(self.den, self.sampler, layers, n=self.qcfg.calib_n,
                                center=self.qcfg.bias_correction)
            out = {}
            for l in layers:
                w = jnp.asarray(layer_params(self.den.params, self.den.layers[l])["kernel"], jnp.float32)
                parts = len(self.weight_parts(l, w) or (0,))
                start = [init[(l, "kernel", j)] for j in range(parts)]  # (C, *scale shape) each
                dw = lambda rs, b, l=l, w=w: (self.quantize_weight(l, w, b, ratios=rs) - w  # noqa: E731
                                              ).reshape(-1, w.shape[-1])
                best = output_clip_ratios(grams[l], dw, [r[idx] for r in start], CLIP_GRID,
                                          [self.qcfg.bit_choices[c] for c in idx])
                out.update({(l, "kernel", j): start[j].at[idx].set(best[j]) for j in range(parts)})
            return out

        q = self.qcfg
        key = ("output-clip", q.w_spec, q.bit_choices, CLIP_GRID, OUTPUT_CLIP_MAX_BITS, q.calib_n, q.bias_correction,
               q.smooth_min_bits, self.sampler.kind, self.num_steps, float(getattr(self.sampler, "eta", 0.0)),
               sorted(self.input_splits.items()), self._smooth_tag(), _tag(init), self.den.layer_hash)
        return cached_arrays("oclip", self.den, key, compute)

    def smooth_scale(self, l: int, bits_w: jax.Array) -> jax.Array | None:
        """Layer l's SmoothQuant scales (Cin,) at weight bits ``bits_w`` (1 below smooth_min_bits); None when the
        layer is not smoothed."""
        s = self.smooth.get(l)
        return None if s is None else jnp.where(jnp.asarray(bits_w) >= self.qcfg.smooth_min_bits, s, 1.0)

    def smoothed(self, l: int, w: jax.Array, bits_w: jax.Array, name: str = "kernel") -> jax.Array:
        """s·W (SmoothQuant scales at ``bits_w`` along the input-channel axis −2) for a smoothed layer's kernel,
        else W itself."""
        s = self.smooth_scale(l, bits_w) if name == "kernel" else None
        return w if s is None else w * s[:, None]

    def quantize_weight(self, l: int, w: jax.Array, bits: jax.Array, name: str = "kernel",
                        ratios: Sequence[jax.Array] | None = None) -> jax.Array:
        """Layer l's weight fake-quantized at ``bits``: per input-channel slice when its input is split, with the
        searched clipping ratio of ``bits`` when weight_clipping is on (``ratios``: one per slice instead, in the scale
        shape, and no learned rounding: what the clipping search tries); with smoothquant, Q(s·W)/s (the layer then
        sees Q(X/s)·s, so the product is Q(X/s)·Q(s·W)); exactly W at float passthrough."""
        counter = iter(range(1 << 30))
        q = lambda p: fake_quant(p, bits, self.qcfg.w_spec,  # noqa: E731
                                 absmax=self.weight_absmax(l, name, next(counter), p, bits, ratios))
        sizes = self.weight_parts(l, w)
        ws = self.smoothed(l, w, bits, name)
        out = split_apply(ws, sizes, q, axis=-2) if sizes else q(ws)
        if ws is not w:  # back to X's basis
            out = jnp.where(bits >= 32, w, out / self.smooth_scale(l, bits)[:, None].astype(out.dtype))
        if ratios is None and l in getattr(self, "recon", {}) and name == "kernel":  # learned rounding at its choices
            r = jnp.asarray(self._recon_rows)[to_index(bits, self.qcfg.bit_choices)]
            out = jnp.where(r >= 0, self.recon[l][jnp.maximum(r, 0)].astype(out.dtype), out)
        return out

    @functools.cached_property
    def _recon_rows(self) -> np.ndarray:
        """(C,) row of each bit choice in the reconstruction tables (−1: not reconstructed)."""
        rb = list(self.qcfg.recon_bits)
        return np.asarray([rb.index(c) if c in rb else -1 for c in self.qcfg.bit_choices], np.int32)

    def weight_absmax(self, l: int, name: str, part: int, w: jax.Array, bits: jax.Array,
                      ratios: Sequence[jax.Array] | None = None) -> jax.Array | None:
        """The range of weight slice ``part`` of layer l at ``bits``: the searched fraction of its absmax
        (weight_clipping; ``ratios[part]`` instead when given), else None (the quantizer's own dynamic range)."""
        if ratios is not None:
            return ratios[part] * range_from(w, self.qcfg.w_spec)
        r = self.clip_ratios.get((l, name, part))
        if r is None:
            return None
        return r[to_index(bits, self.qcfg.bit_choices)] * range_from(w, self.qcfg.w_spec)

    def quantize_params(self, bits_w: jax.Array, i: jax.Array | None = None) -> Any:
        """The params collection with each layer's weights fake-quantized at bits_w[l] (bits_w: (L,)), and, with
        ``qcfg.bias_correction`` and a sampler step ``i``, each corrected layer's bias shifted by
        −E[a]_i · (Q(W) − W) (summed over kernel positions; ``i=None`` leaves biases alone).

        With ``qcfg.precompute_weights`` the weights come from ``weight_table`` (bits must
        be in ``bit_choices``, which every public entry point checks); by default they are quantized here,
        which keeps the straight-through gradient to the float weights (QAT)."""
        if not self.qcfg.precompute_weights:
            params = map_layer_weights(self.den.params, self.den.layers,
                                       lambda l, w, name: self.quantize_weight(l, w, bits_w[l], name), named=True)
        else:
            idx = to_index(bits_w, self.qcfg.bit_choices)
            params = map_layer_weights(self.weight_table, self.den.layers, lambda l, stack: stack[idx[l]])
        if i is None or not self.bias_deltas:
            return params
        idx = to_index(bits_w, self.qcfg.bit_choices)
        for l, delta in self.bias_deltas.items():
            node = layer_params(params, self.den.layers[l])
            node["bias"] = node["bias"] - delta[i, idx[l]].astype(node["bias"].dtype)
        return params

    def act_range(self, l: int, part: int, i: jax.Array, bits: jax.Array, v: jax.Array
                  ) -> tuple[jax.Array, jax.Array] | None:
        """The dynamic per-tensor (lo, hi) range of input part ``part`` of layer l at sampler step i for one image's
        (smoothed) tensor ``v`` at ``bits``: its min/max or percentiles (act_clip), times the MSE clipping ratio of
        (l, step bucket, part, bits); None for plain min/max ranges (the spec's own dynamic quantizer, any
        granularity)."""
        pct = self.qcfg.act_percentile if self.qcfg.act_clip == "percentile" else None
        r = self.act_ratios.get(l)
        if pct is None and r is None:
            return None
        lo, hi = act_base_range(v, self.qcfg.a_spec, pct)
        ratio = 1.0 if r is None else r[self.bucket(i), part, to_index(bits, self.qcfg.bit_choices)]
        return ratio * lo, ratio * hi

    def act_quant_fn(self, i: jax.Array, bits_a: jax.Array, bits_w: jax.Array | None = None
                     ) -> Callable[[int, jax.Array], jax.Array]:
        """fn(l, a) -> layer l's input a fake-quantized with bits_a[l] at sampler step i: static ranges of step i's
        bucket, or dynamic ranges per image (one image's error never depends on its batch-mates), one quantizer
        per concatenated part with split_concat; ranges clipped by act_clip (:meth:`act_range`); with smoothquant a
        is divided by the layer's scales s at its weight bits ``bits_w`` (None: float weights) before quantization and
        multiplied back after (exactly a at float passthrough)."""
        spec, k = self.qcfg.a_spec, self.bucket(i)
        if self.qcfg.act_ranges == "static":
            table = self.act_ranges_table[k]

            def static(l, a):
                r = self.act_ratios.get(l)
                ratio = 1.0 if r is None else r[k, 0, to_index(bits_a[l], self.qcfg.bit_choices)]
                return quant_act(a, bits_a[l], spec, table[l, 0], table[l, 1], ratio)
            return static

        def fn(l, a):
            s = self.smooth_scale(l, 32 if bits_w is None else bits_w[l])
            v = a / s if s is not None else a
            sizes = self.input_splits.get(l)
            sizes = sizes if sizes and a.shape[-1] == sum(sizes) else (a.shape[-1],)

            def part(p, j):
                rng = self.act_range(l, j, i, bits_a[l], p)
                return fake_quant(p, bits_a[l], spec) if rng is None else quant_act(p, bits_a[l], spec, *rng)

            def image(u):
                parts = jnp.split(u, np.cumsum(sizes)[:-1].tolist(), axis=-1)
                return jnp.concatenate([part(p, j) for j, p in enumerate(parts)], axis=-1)

            y = jax.vmap(image)(v)
            return y if s is None else jnp.where(bits_a[l] >= 32, a, y * s)
        return fn

    def eps(self, x: jax.Array, i: jax.Array, bits_w: jax.Array, bits_a: jax.Array, keys: jax.Array | None = None
            ) -> jax.Array:
        """Quantized eps at sampler step i for x (B, H, W, C), with (L,) bits; ``keys`` (B,): the images' keys (a
        conditional model's requests; both guidance branches are quantized with the same bits)."""
        t = jnp.full((x.shape[0],), self.sampler.timesteps[i], jnp.int32)
        with contextlib.ExitStack() as stack:
            if self.batched_conv != "xla":
                stack.enter_context(nn.intercept_methods(conv_interceptor(self.batched_conv)))
            stack.enter_context(nn.intercept_methods(activation_interceptor(self.den.layers,
                                                                            self.act_quant_fn(i, bits_a, bits_w))))
            return self.den.apply(self.quantize_params(bits_w, i), x, t, keys)

    def step(self, x: jax.Array, i: jax.Array, keys: jax.Array, bits_w: jax.Array, bits_a: jax.Array) -> jax.Array:
        """One quantized reverse step x_i -> x_{i+1} (B images, per-image keys (B,))."""
        return sampler_step(self.sampler, x, self.eps(x, i, bits_w, bits_a, keys), i, keys)

    def fp_step(self, x: jax.Array, i: jax.Array, keys: jax.Array) -> jax.Array:
        t = jnp.full((x.shape[0],), self.sampler.timesteps[i], jnp.int32)
        return sampler_step(self.sampler, x, self.den(x, t, keys), i, keys)

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


def _tag(arrays: Mapping[Any, Any]) -> str:
    """A short hash of a dict of arrays (keys sorted): what a cache key records of a calibration product it uses."""
    return hashlib.sha256(b"".join(np.asarray(arrays[k]).tobytes() for k in sorted(arrays))).hexdigest()[:12]


def split_apply(x: jax.Array, sizes: Sequence[int], fn: Callable[[jax.Array], jax.Array], *, axis: int
                ) -> jax.Array:
    """fn applied to each part of x split into ``sizes`` along ``axis``, the parts concatenated back."""
    parts = jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis)
    return jnp.concatenate([fn(p) for p in parts], axis=axis)


def make_engine(den: Denoiser, *, steps: int = 10, sampler: str = "ddim", eta: float = 0.0,
                qcfg: QuantConfig | None = None, calib_n: int | None = None) -> QuantEngine:
    """Build a :class:`QuantEngine`. Static activation ranges come from the table stored with the model
    (``qpolicy calibrate``) if there is one for this sampler, else from the on-disk cache, else they are
    calibrated now (and cached)."""
    qcfg = qcfg or QuantConfig()
    if calib_n is not None:
        qcfg = dataclasses.replace(qcfg, calib_n=calib_n)
    calib_n = qcfg.calib_n
    if qcfg.range_buckets > steps:  # a bucket per step at most: empty buckets have no range
        qcfg = dataclasses.replace(qcfg, range_buckets=steps)
    smp = make_sampler(den.schedule, sampler, steps, eta=eta)
    table = static_act_ranges(den, smp, qcfg, calib_n) if qcfg.act_ranges == "static" else None
    return QuantEngine(den=den, sampler=smp, qcfg=qcfg, act_ranges_table=table)
