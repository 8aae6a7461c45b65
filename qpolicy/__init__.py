"""qpolicy: adaptive precision policies for diffusion models.

The public surface: load or wrap a denoiser, list its quantizable layers, build a quantized
sampling engine, evaluate bit schedules, and (in ``qpolicy.envs`` / ``qpolicy.agents``) train
and compare precision policies.
"""
__version__ = "0.1.0"

from .cost import CostModel
from .denoiser import Denoiser, available_models, generate, load_denoiser, wrap_denoiser
from .diffusion import make_sampler, make_schedule
from .layers import LayerInfo
from .bits import DEFAULT_BIT_CHOICES
from .quant import ACT_DEFAULT, WEIGHT_DEFAULT, QuantSpec, fake_quant
from .banks import reference_bank
from .engine import QuantConfig, QuantEngine, evaluate_schedule, make_engine, uniform_bits


def layers(denoiser: Denoiser) -> tuple[LayerInfo, ...]:
    """The quantizable-layer registry of ``denoiser`` (path, kind, weight shape, params, MACs per image).

    Its order is the action order: column l of every bits[T, L] array is layer l."""
    return denoiser.layers


__all__ = [
    "ACT_DEFAULT", "DEFAULT_BIT_CHOICES", "WEIGHT_DEFAULT", "CostModel", "Denoiser", "LayerInfo", "QuantConfig",
    "QuantEngine", "QuantSpec", "available_models", "evaluate_schedule", "fake_quant", "generate", "layers",
    "load_denoiser", "make_engine", "make_sampler", "make_schedule", "reference_bank", "uniform_bits", "wrap_denoiser",
]
