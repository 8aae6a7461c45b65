"""How layers are quantized: QuantConfig (static, compile-time), its named presets and the quantizer block.

The engine that runs a config is :mod:`qpolicy.engine` (which re-exports every public name here); the calibration
products the PTQ switches turn on come from :mod:`qpolicy.ptq` and :mod:`qpolicy.reconstruct`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from .bits import DEFAULT_BIT_CHOICES, check_choices
from .config import check
from .ptq import ACT_CLIP_MODES
from .quant import ACT_DEFAULT, ACT_RANGE_MODES, WEIGHT_DEFAULT, QuantSpec


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
        H100: benchmarks/results/*precomputed_weights.json).
    split_concat: shortcut splitting (Q-Diffusion): a layer whose input concatenates differently scaled tensors
        gets one activation quantizer per part and one weight quantizer per input-channel slice (parts found in
        the model's jaxpr, :func:`qpolicy.ptq.input_splits`); with static activation ranges only the weights are
        split (static ranges are calibrated per tensor).
    bias_correction: empirical bias correction of the weight quantization (Nagel et al. 2019), per sampler step:
        each conv/dense bias absorbs E[a] · (Q(W) − W) with E[a] the layer's mean input on FP calibration
        trajectories (:func:`qpolicy.ptq.input_means`). Removes the per-channel mean shift of eps that DDIM
        amplifies ~157x at t ≈ T (what broke patches32 at W8).
    weight_clipping: MSE clipping search per output channel and bit choice (:func:`qpolicy.ptq.weight_clip_ratios`:
        the clipping ratio of the absmax minimising the weight's quantization error, searched over 0.5..1).
    clip_objective: what the weight clipping search minimises: "weight" (the weight's quantization MSE) or "output"
        (output-aware: at weight bits <= 8, per output channel and bit choice the ratio minimising the layer's OUTPUT
        error E||X·(Q(W) − W)||² on its inputs along FP calibration trajectories (centred per step when bias
        correction is on, whose per-step bias absorbs the mean), conv / dense kernels only, searched from the weight-MSE
        ratios (:func:`qpolicy.reconstruct.output_clip_ratios`)). "output" needs weight_clipping.
    act_clip: activation clipping: "none" (min/max ranges), "percentile" (the (100 − p, p) percentiles of each
        image's tensor (dynamic) or of the calibration activations per (layer, step bucket) (static), p =
        act_percentile) or "mse" (the range times a ratio per (layer, step bucket, input part, bit choice) minimising
        the activation's quantization MSE on FP calibration trajectories, :func:`qpolicy.ptq.act_clip_ratios`).
    act_percentile: p of act_clip="percentile", in [50, 100].
    smoothquant: SmoothQuant scale migration (Xiao et al. 2023) on every conv / dense layer: inputs divided and
        weights multiplied per input channel by s = max|X|^α / max|W|^(1−α) (calibrated on the calib bank; the
        weights are quantized as s·W per bit choice), α per layer (:func:`qpolicy.ptq.smooth_scales`). Dynamic
        activation ranges only: with act_ranges="static" it is set to False (the quantizer block records that).
    smooth_alpha: fixed α for smoothquant; none = searched per layer over :data:`qpolicy.ptq.SMOOTH_ALPHAS`.
    smooth_min_bits: smoothquant applies where the layer's weight bits are >= this (below, the migration makes the
        weights harder to quantize than it makes the activations easier: measured at W4A8 on digits16); the input
        and the weight of a layer always see the same s, chosen by the traced weight bits.
    reconstruction: AdaRound learned rounding (output reconstruction per conv / dense layer on FP calibration inputs,
        optax) at the weight bit choices ``recon_bits``, precomputed per choice (:mod:`qpolicy.reconstruct`).
    recon_bits: weight bits that get learned rounding (integers in 2..8; those not in bit_choices are dropped).
    recon_iters: Adam iterations per layer and bit choice (AdaRound).
    recon_method: "adaround" (learned floor/ceil rounding, optax) or "gptq" (GPTQ, Frantar et al. 2023: rows rounded
        one at a time on the same grid, each rounding error compensated on the rows left through the inverse of the
        calibration inputs' second moment; :func:`qpolicy.reconstruct.gptq`).
    attn_matmuls: precision of the activation-activation matmuls of attention (scores q·kᵀ, softmax, probs·v): only
        "float" (they are not intercepted; recorded so a schedule says so).
    calib_n: calibration images for static ranges, bias correction, activation clipping and SmoothQuant.
    preset: the name recorded for this combination (see :data:`QUANT_PRESETS`; "custom" when fields differ).
    """

    w_spec: QuantSpec = WEIGHT_DEFAULT
    a_spec: QuantSpec = ACT_DEFAULT
    act_ranges: str = "dynamic"
    range_buckets: int = 4
    bit_choices: tuple[int, ...] = DEFAULT_BIT_CHOICES
    precompute_weights: bool = False
    split_concat: bool = True
    bias_correction: bool = True
    weight_clipping: bool = True
    clip_objective: str = "weight"
    act_clip: str = "none"
    act_percentile: float = 99.99
    smoothquant: bool = False
    smooth_alpha: float | None = None
    smooth_min_bits: int = 8
    reconstruction: bool = False
    recon_bits: tuple[int, ...] = (4, 5, 6)
    recon_iters: int = 300
    recon_method: str = "adaround"
    attn_matmuls: str = "float"
    calib_n: int = 32

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass, normalised fields)
        put("act_ranges", check("act_ranges", self.act_ranges, kind="choice", choices=ACT_RANGE_MODES))
        put("calib_n", check("calib_n", self.calib_n, kind="int", lo=1))
        for f in ("precompute_weights", "split_concat", "bias_correction", "weight_clipping", "smoothquant",
                  "reconstruction"):
            put(f, check(f, getattr(self, f), kind="bool"))
        put("act_clip", check("act_clip", self.act_clip, kind="choice", choices=ACT_CLIP_MODES))
        put("clip_objective", check("clip_objective", self.clip_objective, kind="choice", choices=CLIP_OBJECTIVES))
        if self.clip_objective == "output" and not self.weight_clipping:
            raise ValueError("clip_objective='output' is an objective of the weight clipping search: it needs "
                             "weight_clipping=True")
        put("act_percentile", check("act_percentile", self.act_percentile, kind="real", lo=50, hi=100))
        put("smooth_alpha", check("smooth_alpha", self.smooth_alpha, kind="real", lo=0, hi=1, optional=True))
        put("smooth_min_bits", check("smooth_min_bits", self.smooth_min_bits, kind="int", lo=2, hi=32))
        put("recon_iters", check("recon_iters", self.recon_iters, kind="int", lo=1))
        put("recon_method", check("recon_method", self.recon_method, kind="choice", choices=RECON_METHODS))
        put("bit_choices", check_choices(self.bit_choices))
        # weight bits that get learned rounding: integers in 2..8; those that are not bit choices are dropped
        put("recon_bits", tuple(b for b in (check("recon_bits", b, kind="int", lo=2, hi=8) for b in self.recon_bits)
                                if b in self.bit_choices))
        put("attn_matmuls", check("attn_matmuls", self.attn_matmuls, kind="choice", choices=ATTN_MATMULS))
        if self.act_ranges == "static":  # static ranges are calibrated on the unsmoothed inputs
            put("smoothquant", False)
        if self.range_buckets < 1:
            raise ValueError(f"range_buckets must be >= 1, got {self.range_buckets}")

    @property
    def preset(self) -> str:
        ptq = {k: getattr(self, k) for k in PTQ_FIELDS}
        return next((name for name, v in QUANT_PRESETS.items() if v == ptq), "custom")

    def quantizer_block(self) -> dict[str, Any]:
        """The ``quantizer`` block of a BitSchedule: specs, range mode, and the PTQ techniques applied."""
        from .schedule import quantizer_dict

        return {**quantizer_dict(self.w_spec, self.a_spec, self.act_ranges), "preset": self.preset,
                **{k: getattr(self, k) for k in (*PTQ_FIELDS, *PTQ_PARAMS)}}

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dataclasses.asdict(self.w_spec), "activations": dataclasses.asdict(self.a_spec),
                "act_ranges": self.act_ranges, "range_buckets": self.range_buckets,
                "bit_choices": list(self.bit_choices), "preset": self.preset,
                **{k: getattr(self, k) for k in (*PTQ_FIELDS, *PTQ_PARAMS)}}


#: The PTQ technique switches of QuantConfig (a preset fixes every one of them).
PTQ_FIELDS = ("split_concat", "bias_correction", "weight_clipping", "clip_objective", "act_clip", "smoothquant",
              "reconstruction", "recon_method")
#: Their parameters, recorded in the quantizer block with them.
PTQ_PARAMS = ("act_percentile", "smooth_alpha", "smooth_min_bits", "recon_bits", "recon_iters", "attn_matmuls")
#: Weight reconstruction methods (QuantConfig.recon_method): AdaRound learned rounding, GPTQ error compensation.
RECON_METHODS = ("adaround", "gptq")
#: Precisions of attention's activation-activation matmuls (QuantConfig.attn_matmuls).
ATTN_MATMULS = ("float",)
#: Objectives of the weight clipping search (QuantConfig.clip_objective).
CLIP_OBJECTIVES = ("weight", "output")
#: Weight bits at and below which clip_objective="output" searches on the layer output (above: weight MSE).
OUTPUT_CLIP_MAX_BITS = 8
_OFF = {"split_concat": False, "bias_correction": False, "weight_clipping": False, "clip_objective": "weight",
        "act_clip": "none", "smoothquant": False, "reconstruction": False, "recon_method": "adaround"}
_PTQ = {**_OFF, "split_concat": True, "bias_correction": True, "weight_clipping": True}
#: Named quantizer presets: "ptq-smooth" (the default: ptq + SmoothQuant at weight bits >= 8), "ptq" (shortcut
#: splitting, bias correction, weight clipping search), "plain" (per-tensor dynamic activations, per-channel weights,
#: nothing else: the engine before the PTQ toolbox), "ptq-recon" (ptq + AdaRound at 4-6 weight bits), "full" (ptq +
#: SmoothQuant + AdaRound), "ptq-gptq" (ptq + GPTQ at 4-6 weight bits: digits16 W4A8 final error 0.050 -> 0.027 at
#: n = 128 on the CPU, README).
#: MSE / percentile activation clipping are switches in no preset (no gain measured; see the README).
QUANT_PRESETS = {"ptq": _PTQ, "plain": _OFF,
                 "ptq-smooth": {**_PTQ, "smoothquant": True},
                 "ptq-recon": {**_PTQ, "reconstruction": True},
                 "ptq-gptq": {**_PTQ, "reconstruction": True, "recon_method": "gptq"},
                 "full": {**_PTQ, "smoothquant": True, "reconstruction": True}}


#: The default preset (QuantConfig()'s fields): the one the H100 results, the demo's timing and the tests were
#: measured with; ptq-smooth measured better on the CPU at small n (README) and awaits the H100 ablation.
DEFAULT_PRESET = "ptq"


def quant_config(preset: str = DEFAULT_PRESET, **fields: Any) -> QuantConfig:
    """QuantConfig of a named preset (:data:`QUANT_PRESETS`), with further fields overridden. With static activation
    ranges a preset's SmoothQuant is left out (static ranges are calibrated on unsmoothed inputs)."""
    if preset not in QUANT_PRESETS:
        raise ValueError(f"quantizer preset must be one of {tuple(QUANT_PRESETS)}, got {preset!r}")
    return QuantConfig(**{**QUANT_PRESETS[preset], **fields})


def quant_config_from_block(block: Mapping[str, Any], *, bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
                            source: str = "schedule") -> QuantConfig:
    """The QuantConfig a schedule's ``quantizer`` block describes (specs, range mode, PTQ switches), so the
    schedule runs under the quantizer it was made for. ValueError naming ``source`` for a block it cannot hold."""
    from .schedule import quant_spec_from

    try:
        return QuantConfig(w_spec=quant_spec_from(block["weights"]), a_spec=quant_spec_from(block["activations"],
                                                                                            "quantizer.activations"),
                           act_ranges=block["act_ranges"], bit_choices=tuple(bit_choices),
                           **{k: block[k] for k in PTQ_FIELDS if k in block})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{source}: quantizer block lacks or mistypes {e}; accepted keys: weights, activations, "
                         f"act_ranges, {', '.join(PTQ_FIELDS)}") from None
