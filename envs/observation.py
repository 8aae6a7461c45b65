"""Observation pieces of the quantized-diffusion envs: what a deployed sampler knows, never the FP reference.

The full layout (names in order) is :func:`obs_names`; the table in :mod:`qpolicy.envs.core` explains each entry.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.layers import LayerInfo
from qpolicy.metrics import thumbnail_features

KINDS = ("dense", "conv", "conv_transpose", "dense_general", "einsum", "custom")
STAGES = ("down", "mid", "up", "other")
TIME_NAMES = ("step_frac", "t_frac", "t_sin", "t_cos", "sqrt_abar")
STAT_NAMES = ("x_mean", "x_std", "x_absmax")


def layer_features(layers: Sequence[LayerInfo]) -> np.ndarray:
    """(L, 1 + len(KINDS) + 2 + len(STAGES)) static features per layer: ℓ/L, kind one-hot, normalised log MACs and
    log params (min-max over layers), U-Net stage one-hot from the path's first component."""
    L = len(layers)

    def norm_log(v):
        v = np.log(np.maximum(np.asarray(v, np.float64), 1.0))
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else np.full_like(v, 0.5)

    macs, prm = norm_log([l.macs for l in layers]), norm_log([l.params for l in layers])
    rows = []
    for l, info in enumerate(layers):
        kind = np.eye(len(KINDS))[KINDS.index(info.kind) if info.kind in KINDS else KINDS.index("custom")]
        head = info.path.split("/")[0]
        stage = next((k for k in STAGES[:3] if head == k or head.startswith(k + "_")), "other")
        rows.append(np.concatenate([[l / L], kind, [macs[l], prm[l]], np.eye(len(STAGES))[STAGES.index(stage)]]))
    return np.stack(rows)


def obs_names(*, image_channels: int, thumb_size: int, num_layers: int, tied: bool, layerwise: bool,
              request_names: Sequence[str] = ()) -> list[str]:
    """Names of the observation's entries, in order; ``request_names``: a conditional model's request block
    (qpolicy.conditioning.Conditioning.feature_names: label one-hot and guidance scale), after the thumbnail."""
    s, L = thumb_size, num_layers
    names = [*TIME_NAMES, *STAT_NAMES]
    names += [f"thumb[{y},{x},{c}]" for y in range(s) for x in range(s) for c in range(image_channels)]
    names += list(request_names)
    groups = ("w",) if tied else ("w", "a")
    if layerwise:
        names += ["layer_frac", *[f"kind[{k}]" for k in KINDS], "log_macs", "log_params",
                  *[f"stage[{k}]" for k in STAGES]]
        names += [f"cur_bits_{g}[{l}]" for g in groups for l in range(L)]
    names += [f"prev_bits_{g}[{l}]" for g in groups for l in range(L)]
    names += ["cost"]
    return names


def image_block(x: jax.Array, thumb_size: int) -> jax.Array:
    """x_t statistics and thumbnail, averaged over the env's B images: (3 + s·s·C,) = [mean, std, absmax, thumb]."""
    feats = thumbnail_features(x, thumb_size)
    stats = jnp.stack([x.mean((1, 2, 3)).mean(), x.std((1, 2, 3)).mean(), jnp.abs(x).max((1, 2, 3)).mean()])
    return jnp.concatenate([stats, feats[:, :-2].mean(0)])


def bits_feature(idx: jax.Array, log2_choices: jax.Array) -> jax.Array:
    """log2(bits)/5 of choice indices (32 bits -> 1); 0 where nothing is chosen yet (index -1)."""
    C = log2_choices.shape[0]
    return jnp.where(idx >= 0, log2_choices[jnp.clip(idx, 0, C - 1)], 0.0)
