"""``EnvConfig``: the keyword-only, validated configuration of the quantized-diffusion environments."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qpolicy.batched_conv import BATCHED_CONV_SETTINGS
from qpolicy.bits import DEFAULT_BIT_CHOICES, check_choices
from qpolicy.config import check
from qpolicy.denoiser import DEFAULT_MODEL, Denoiser
from qpolicy.engine import QUANT_PRESETS
from qpolicy.quant import ACT_RANGE_MODES

REWARD_MODES = ("delta", "terminal", "budget")
SAMPLERS = ("ddim", "ddpm")
COST_MODES = ("bops", "latency")
ACTION_SPACES = ("bits", "profiles")
#: fields added after the run fingerprint's first version: a run config's fingerprint includes them only when they
#: differ from their defaults, so the fingerprints of existing runs (and the policies carrying them) stay valid
LATER_FIELDS = ("cost", "latency_table", "action_space", "profiles", "num_profiles", "profile_spread")
#: speed knobs: the same numbers up to float rounding, so never part of a run's fingerprint
SPEED_FIELDS = ("batched_conv",)
#: the fields of the profile action space (they shape the env's actions, never its engine)
PROFILE_FIELDS = ("action_space", "profiles", "num_profiles", "profile_spread")
ENV_BANKS = ("train", "eval")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvConfig:
    """Configuration of ``qpolicy/QuantDiffusion-v0`` and ``qpolicy/QuantDiffusionLayerwise-v0``.

    model: shipped model name ("digits16"), checkpoint folder, or a qpolicy.denoiser.Denoiser.
    num_steps: T, sampler steps per episode.
    sampler: "ddim" | "ddpm".
    eta: DDIM noise scale (0 = deterministic).
    bit_choices: accepted bitwidths (strictly increasing, in [2, 32]; 32 = float); actions index it.
    tie_weights_activations: one action entry per layer for both W and A bits (true) or separate W/A entries.
    images_per_env: B, images one episode denoises (drawn from the bank at reset).
    reward: "delta" | "terminal" | "budget" (see qpolicy.envs.core).
    alpha: weight of the trajectory error in the reward.
    lam: weight of the cost in the reward.
    budget: cost budget in units of the FP32 trajectory's cost (BOPs: 0.0625 = uniform W8A8; or latency with cost
        "latency"), reward "budget".
    beta_fd: weight of the terminal fd proxy (reward "terminal").
    error_clip: per-image relative errors are clipped to <= error_clip before entering the reward.
    bank: "train" | "eval" (disjoint noise streams).
    bank_size: images in the FP reference bank.
    act_ranges: "dynamic" | "static" activation ranges.
    quant_preset: quantizer preset of the engine (qpolicy.engine.QUANT_PRESETS): "ptq" (the default: splitting,
        bias correction, clipping) | "ptq-smooth" (ptq + SmoothQuant) | "plain" | "ptq-recon" | "ptq-gptq" | "full".
    thumb_size: side of the x_t thumbnail in the observation.
    cost: "bops" (BOPs_l = MACs_l * b_w * b_a) | "latency" (a measured per-(layer, b_w, b_a) table, see
        qpolicy.latency; reward, budgets, baselines and summaries all price schedules by it).
    latency_table: path of the latency table JSON (cost "latency"); null = the one stored with the model for this
        device (<checkpoint>/latency/<device>.json, written by `qpolicy latency`).
    action_space: "bits" (free per-layer bits: the per-step env's action is a choice index per layer) | "profiles"
        (each step's action picks one of K precision profiles, per-layer bit vectors a runtime holds as K model
        variants; per-step env only; see qpolicy.profiles).
    profiles: path of a precision-profiles JSON file (qpolicy.profiles; written by `qpolicy profiles`); null = found
        by the sensitivity ILP at num_profiles budgets spread around budget (cached; recorded in the run folder).
    num_profiles: K, profiles the search finds (action_space "profiles", profiles null); duplicates are dropped.
    profile_spread: ratio between neighbouring budgets of the profile search (budget * spread^(k - (K-1)/2)).
    batched_conv: how the envs' convolutions run with per-env quantized kernels (qpolicy.batched_conv): "auto" ("map"
        on CPUs, "xla" elsewhere) | "xla" (JAX's vmap rule, a grouped convolution) | "im2col" (patches x kernel as
        one batched GEMM) | "map" (one plain convolution per env in a loop); a speed knob, the same numbers up to
        float rounding, never in the run fingerprint (benchmarks/env_step_profile.py compares them).
    """

    model: Any = DEFAULT_MODEL
    num_steps: int = 10
    sampler: str = "ddim"
    eta: float = 0.0
    bit_choices: tuple[int, ...] = DEFAULT_BIT_CHOICES
    tie_weights_activations: bool = True
    images_per_env: int = 4
    reward: str = "delta"
    alpha: float = 1.0
    lam: float = 1.0
    budget: float = 0.0625
    beta_fd: float = 1.0
    error_clip: float = 10.0
    bank: str = "train"
    bank_size: int = 64
    act_ranges: str = "dynamic"
    quant_preset: str = "ptq"
    thumb_size: int = 4
    cost: str = "bops"
    latency_table: str | None = None
    action_space: str = "bits"
    profiles: str | None = None
    num_profiles: int = 4
    profile_spread: float = 2.0
    batched_conv: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path, Denoiser)):
            raise ValueError(f"model must be a shipped model name (e.g. 'digits16'), a checkpoint folder path, or a "
                             f"qpolicy.denoiser.Denoiser; got {type(self.model).__name__}")
        put = lambda name, **rule: object.__setattr__(self, name, check(name, getattr(self, name), **rule))
        for name in ("num_steps", "images_per_env", "bank_size", "thumb_size"):
            put(name, kind="int", lo=1)
        for name, accepted in (("sampler", SAMPLERS), ("reward", REWARD_MODES), ("bank", ENV_BANKS),
                               ("act_ranges", ACT_RANGE_MODES), ("quant_preset", tuple(QUANT_PRESETS))):
            put(name, kind="choice", choices=accepted)
        for name in ("eta", "alpha", "lam", "budget", "beta_fd"):
            put(name, kind="real", lo=0)
        put("error_clip", kind="real", lo=0, lo_open=True)
        put("tie_weights_activations", kind="bool")
        put("cost", kind="choice", choices=COST_MODES)
        if isinstance(self.latency_table, Path):
            object.__setattr__(self, "latency_table", str(self.latency_table))
        put("latency_table", kind="str", optional=True)
        if self.latency_table is not None and self.cost != "latency":
            raise ValueError(f"latency_table applies to cost 'latency' only; got cost {self.cost!r} (set cost: latency "
                             "or drop latency_table)")
        put("action_space", kind="choice", choices=ACTION_SPACES)
        if isinstance(self.profiles, Path):
            object.__setattr__(self, "profiles", str(self.profiles))
        put("profiles", kind="str", optional=True)
        put("num_profiles", kind="int", lo=1, hi=64)
        put("profile_spread", kind="real", lo=1, lo_open=True)
        put("batched_conv", kind="choice", choices=BATCHED_CONV_SETTINGS)
        if self.action_space != "profiles":
            changed = [f for f in PROFILE_FIELDS[1:] if getattr(self, f) != getattr(EnvConfig, f)]
            if changed:
                raise ValueError(f"{', '.join(changed)} apply to action_space 'profiles' only; got action_space "
                                 f"{self.action_space!r} (set action_space: profiles or drop {', '.join(changed)})")
        object.__setattr__(self, "bit_choices", check_choices(self.bit_choices))
        if self.cost == "latency" and 32 not in self.bit_choices:
            raise ValueError(f"cost 'latency' needs 32 in bit_choices (latency costs are relative to the measured FP32 "
                             f"model); got bit_choices {list(self.bit_choices)}")
        if self.bank_size < self.images_per_env:
            raise ValueError(f"bank_size ({self.bank_size}) must be >= images_per_env ({self.images_per_env}): "
                             "an episode draws its images from the bank without replacement")
        if self.sampler == "ddpm" and self.eta not in (0.0, 1.0):
            raise ValueError(f"eta applies to sampler='ddim' only; with sampler='ddpm' leave eta at 0, got {self.eta}")

    @property
    def num_choices(self) -> int:
        return len(self.bit_choices)

    def replace(self, **kw: Any) -> "EnvConfig":
        return dataclasses.replace(self, **kw)

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields as a run's fingerprint hashes them: every field, except :data:`LATER_FIELDS` at their
        defaults (so configs written before those fields existed keep their fingerprints) and :data:`SPEED_FIELDS`."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in SPEED_FIELDS}
        for f in LATER_FIELDS:
            if d[f] == getattr(EnvConfig, f):
                del d[f]
        return d
