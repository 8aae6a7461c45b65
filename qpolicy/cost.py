"""Cost model: bit operations (BOPs), weight memory, mean bits, and an optional measured-latency table.

BOPs_l = MACs_l * b_w * b_a; a float layer (bits 32) counts 32 * 32. Costs are reported relative to
the FP32 sampler (every layer 32x32) and to uniform W8A8. All functions take bits arrays whose last
axis is the layer axis (any leading axes: steps, envs) and work on NumPy or traced JAX arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .bits import DEFAULT_BIT_CHOICES, check_choices, to_index
from .layers import LayerInfo


def _xp(a):
    return jnp if isinstance(a, jax.Array) else np


@dataclasses.dataclass(frozen=True, eq=False)
class CostModel:
    """Per-layer constants of one denoiser; the single source of every cost the project reports or optimises.

    macs: (L,) MACs per image per forward.
    params: (L,) weight counts.
    bit_choices: the choice set the (L, C, C) :meth:`table` is laid out on.
    latency: optional (L, C, C) measured seconds per image for (choice of b_w, choice of b_a), indexed by
        positions in ``bit_choices``; when given, :meth:`table` and :meth:`step_cost` use it instead of BOPs
        (HAQ-style)."""

    macs: np.ndarray
    params: np.ndarray
    bit_choices: tuple[int, ...] = DEFAULT_BIT_CHOICES
    latency: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bit_choices", check_choices(self.bit_choices))
        L = len(self.macs)
        if len(self.params) != L:
            raise ValueError(f"params has {len(self.params)} entries, macs has {L}")
        if self.latency is not None:
            C = len(self.bit_choices)
            if np.shape(self.latency) != (L, C, C):
                raise ValueError(f"latency table must have shape (L, C, C) = {(L, C, C)} for bit_choices "
                                 f"{self.bit_choices}, got {np.shape(self.latency)}")
            if 32 not in self.bit_choices:
                raise ValueError("a latency table needs 32 in bit_choices (the FP reference)")

    @classmethod
    def from_layers(cls, layers: Sequence[LayerInfo], bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
                    latency: Any = None) -> "CostModel":
        return cls(macs=np.array([l.macs for l in layers], np.float64),
                   params=np.array([l.params for l in layers], np.float64),
                   bit_choices=tuple(int(b) for b in bit_choices),
                   latency=None if latency is None else np.asarray(latency, np.float64))

    @property
    def bops_fp32(self) -> float:
        """BOPs of one FP32 forward per image."""
        return float(self.layer_bops(32, 32).sum())

    def layer_bops(self, bits_w, bits_a):
        """The cost formula, BOPs_l = MACs_l * b_w * b_a, per layer (..., L) for bits broadcastable to (..., L)."""
        xp = _xp(bits_w)
        return xp.asarray(self.macs, xp.float32 if xp is jnp else np.float64) * bits_w * bits_a

    def bops(self, bits_w, bits_a):
        """BOPs per image of one forward for each row of bits (..., L) -> (...)."""
        return self.layer_bops(bits_w, bits_a).sum(-1)

    def table(self) -> np.ndarray:
        """(L, C, C) float64 relative cost of one forward of layer l at (choice i for W, choice j for A): BOPs_l /
        BOPs_FP32 of the whole model, or the latency table over the FP32 model's latency. The reward, the budgets,
        the baselines and :meth:`step_cost` all read this table; a (T, L) schedule costs the mean over steps of
        its row sums (= ``summary()["bops_rel_fp32"]`` in BOPs mode)."""
        if self.latency is not None:
            L = len(self.macs)
            return np.asarray(self.latency) / np.asarray(self.latency)[np.arange(L), -1, -1].sum()
        ch = np.asarray(self.bit_choices, np.float64)
        return np.moveaxis(self.layer_bops(ch[:, None, None], ch[None, :, None]), -1, 0) / self.bops_fp32

    def step_cost(self, bits_w, bits_a):
        """Relative cost c of one forward: BOPs / BOPs_FP32 in (0, 1], or latency / latency_FP32 (bits (..., L), in
        the choice set when a latency table is used; may exceed 1 where a narrower kernel runs slower than FP32)."""
        if self.latency is None:
            return self.bops(bits_w, bits_a) / self.bops_fp32
        xp = _xp(bits_w)
        iw, ia = to_index(bits_w, self.bit_choices), to_index(bits_a, self.bit_choices)
        tab = xp.asarray(self.table())
        return tab[xp.arange(tab.shape[0]), iw, ia].sum(-1)

    def summary(self, bits_w, bits_a) -> dict[str, float]:
        """Cost summary of a schedule bits_w, bits_a: (T, L) (or (L,) for one step).

        bops_rel_fp32 / bops_rel_w8a8: trajectory BOPs over the FP32 / uniform-W8A8 sampler's;
        mean_bits_w / mean_bits_a: plain means over steps and layers; mean_bits_*_macs: MAC-weighted;
        weight_mbytes: sum_l params_l * b_w / 8 / 1e6 averaged over steps (weights held at each step's bits);
        weight_mbytes_fp32: the same at 32 bits; latency_rel_fp32 (with a latency table): trajectory latency over
        the FP32 sampler's; cost_rel_fp32: the cost the table prices (latency_rel_fp32 with a latency table, else
        bops_rel_fp32) -- what budgets, baseline matching and the env's cost use."""
        bw = np.atleast_2d(np.asarray(bits_w, np.float64))
        ba = np.atleast_2d(np.asarray(bits_a, np.float64))
        if bw.shape != ba.shape or bw.shape[-1] != len(self.macs):
            raise ValueError(f"bits_w {bw.shape} and bits_a {ba.shape} must both be (T, L) with L = {len(self.macs)}")
        bops = self.bops(bw, ba).sum()
        T = bw.shape[0]
        w = self.macs / self.macs.sum()
        out = {
            "bops_rel_fp32": float(bops / (T * self.bops_fp32)),
            "bops_rel_w8a8": float(bops / (T * self.bops(8, 8))),
            "gbops_per_image": float(bops / 1e9),
            "mean_bits_w": float(bw.mean()),
            "mean_bits_a": float(ba.mean()),
            "mean_bits_w_macs": float((bw * w).sum(-1).mean()),
            "mean_bits_a_macs": float((ba * w).sum(-1).mean()),
            "weight_mbytes": float((bw * self.params).sum(-1).mean() / 8 / 1e6),
            "weight_mbytes_fp32": float(self.params.sum() * 4 / 1e6),
        }
        out["cost_rel_fp32"] = out["bops_rel_fp32"]
        if self.latency is not None:
            out["latency_rel_fp32"] = float(np.mean(self.step_cost(bw.astype(int), ba.astype(int))))
            out["cost_rel_fp32"] = out["latency_rel_fp32"]
        return out
