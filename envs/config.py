"""``EnvConfig``: the keyword-only, validated configuration of the quantized-diffusion environments."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qpolicy.checks import is_int as _is_int
from qpolicy.checks import is_real as _is_real
from qpolicy.denoiser import DEFAULT_MODEL, Denoiser
from qpolicy.quant import DEFAULT_BIT_CHOICES

REWARD_MODES = ("delta", "terminal", "budget")
SAMPLERS = ("ddim", "ddpm")
ENV_BANKS = ("train", "eval")
ACT_RANGE_MODES = ("dynamic", "static")




@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvConfig:
    """Configuration of ``qpolicy/QuantDiffusion-v0`` and ``qpolicy/QuantDiffusionLayerwise-v0``.

    model: shipped model name (``"digits16"``), checkpoint folder, or a :class:`qpolicy.denoiser.Denoiser`.
    num_steps: T, sampler steps per episode. sampler: ``"ddim"`` | ``"ddpm"``; eta: DDIM noise scale.
    bit_choices: accepted bitwidths (strictly increasing, in [2, 32]; 32 = float passthrough); actions index it.
    tie_weights_activations: one action entry per layer for both W and A bits (True) or separate W/A entries.
    images_per_env: B, images one episode denoises (drawn from the bank at reset).
    reward: ``"delta"`` | ``"terminal"`` | ``"budget"`` (see :mod:`qpolicy.envs.core`).
    alpha: error weight; lam: cost weight; budget: cost budget in units of the FP32 trajectory's BOPs
    (0.0625 = uniform W8A8); beta_fd: weight of the terminal fd proxy; error_clip: per-image relative
    errors are clipped to <= error_clip before entering the reward.
    bank: ``"train"`` | ``"eval"`` (disjoint noise streams); bank_size: images in the FP reference bank.
    act_ranges: ``"dynamic"`` | ``"static"`` activation ranges. thumb_size: side of the x_t thumbnail.
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
    thumb_size: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, Path, Denoiser)):
            raise ValueError(f"model must be a shipped model name (e.g. 'digits16'), a checkpoint folder path, or a "
                             f"qpolicy.denoiser.Denoiser; got {type(self.model).__name__}")
        for name, lo in (("num_steps", 1), ("images_per_env", 1), ("bank_size", 1), ("thumb_size", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name, accepted in (("sampler", SAMPLERS), ("reward", REWARD_MODES), ("bank", ENV_BANKS),
                               ("act_ranges", ACT_RANGE_MODES)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {getattr(self, name)!r}")
        for name in ("eta", "alpha", "lam", "budget", "beta_fd"):
            v = getattr(self, name)
            if not _is_real(v) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not _is_real(self.error_clip) or not self.error_clip > 0:
            raise ValueError(f"error_clip must be a number > 0, got {self.error_clip!r}")
        object.__setattr__(self, "error_clip", float(self.error_clip))
        if not isinstance(self.tie_weights_activations, bool):
            raise ValueError(f"tie_weights_activations must be True or False, got {self.tie_weights_activations!r}")
        try:
            choices = tuple(int(b) for b in self.bit_choices)
            ok = all(float(b) == int(b) for b in self.bit_choices)
        except (TypeError, ValueError):
            ok, choices = False, ()
        if (not ok or not choices or list(choices) != sorted(set(choices)) or choices[0] < 2 or choices[-1] > 32):
            raise ValueError(f"bit_choices must be a non-empty, strictly increasing sequence of integers in [2, 32] "
                             f"(e.g. {DEFAULT_BIT_CHOICES}), got {self.bit_choices!r}")
        object.__setattr__(self, "bit_choices", choices)
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
