"""Noise banks and their full-precision reference trajectories, computed once and cached (memory + disk).

Every image has its own key; the train, eval and calibration banks are disjoint streams of image keys.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .denoiser import weights_hash
from .diffusion import image_keys
from .io import load_cached_array, save_cached_array

BANKS = ("train", "eval", "calib")
#: Noise-bank seeds: the train, eval and calibration banks are disjoint streams of image keys.
BANK_SEEDS = {"train": 1000, "eval": 2000, "calib": 3000}


def cache_dir() -> Path:
    """On-disk cache root: $QPOLICY_CACHE, else ~/.cache/qpolicy."""
    return Path(os.environ.get("QPOLICY_CACHE", Path.home() / ".cache" / "qpolicy"))


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceBank:
    """FP reference trajectories of a bank of image keys.

    keys: (N,) image keys; traj: (S+1, N, H, W, C) float32, traj[0] = x_T, traj[-1] = the FP sample."""

    name: str
    keys: jax.Array
    traj: jax.Array

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])


_BANKS: dict[str, ReferenceBank] = {}


def check_eval_seed(seed: Any) -> int:
    """A noise seed for evaluation that no training, fitting or calibration bank uses."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"eval seed must be an integer >= 0, got {seed!r}")
    used = {v: k for k, v in BANK_SEEDS.items() if k != "eval"}
    if int(seed) in used:
        raise ValueError(f"eval seed {seed} is the {used[int(seed)]} bank's noise stream (seeds in use: "
                         f"{dict(BANK_SEEDS)}); pick another, e.g. {max(BANK_SEEDS.values()) + 1000}")
    return int(seed)


def reference_bank(engine: Any, bank: str = "train", size: int = 64, *, seed: int | None = None,
                   batch_size: int = 256, disk_cache: bool = True, progress: bool = False) -> ReferenceBank:
    """FP trajectories for ``size`` images of the ``bank`` noise stream (seed ``BANK_SEEDS[bank]``, or ``seed`` for
    an eval bank on another stream), computed once and cached in memory and on disk (keyed by model layer hash +
    weights, sampler, bank, seed and size; the file is verified on load against its sidecar, and a bad one is named,
    removed and recomputed). progress: a bar over the batches."""
    if bank not in BANKS:
        raise ValueError(f"bank must be one of {BANKS}, got {bank!r}")
    if size < 1:
        raise ValueError(f"bank size must be >= 1, got {size}")
    if seed is not None and bank != "eval":
        raise ValueError(f"only the eval bank takes another noise seed; the {bank} bank is fixed to "
                         f"{BANK_SEEDS[bank]}")
    seed = BANK_SEEDS[bank] if seed is None else check_eval_seed(seed)
    key = (f"{engine.den.name}_{engine.den.layer_hash}_{weights_hash(engine.den)}_{engine.sampler.kind}"
           f"{engine.num_steps}_eta{engine.sampler.eta:g}_{bank}{size}_s{seed}")
    if key in _BANKS:
        return _BANKS[key]
    keys = image_keys(seed, size)
    path = cache_dir() / "refs" / f"{key}.npy"
    shape = (engine.num_steps + 1, size, *engine.den.image_shape)
    traj = load_cached_array(path, key=key, shape=shape) if disk_cache else None
    if traj is not None:
        traj = jnp.asarray(traj)
    else:
        run = jax.jit(engine.fp_trajectory)
        starts = range(0, size, batch_size)
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"FP reference ({bank}, {size} images)", unit="batch")
        traj = jnp.concatenate([run(keys[s:s + batch_size]) for s in starts], axis=1)
        if not bool(jnp.isfinite(traj).all()):
            raise ValueError(f"the FP sampler of {engine.den.name!r} gives NaN or inf: check the model's weights "
                             "(every weight must be finite)")
        if disk_cache:
            save_cached_array(path, traj, key=key)
    rb = ReferenceBank(name=key, keys=keys, traj=traj)
    _BANKS[key] = rb
    return rb


def subset(bank: ReferenceBank, n: int | None) -> ReferenceBank:
    """The first ``n`` images of ``bank`` (the bank itself when n is None or >= its size)."""
    if n is None or n >= bank.size:
        return bank
    return ReferenceBank(name=f"{bank.name}[:{n}]", keys=bank.keys[:n], traj=bank.traj[:, :n])


def clear_memory_cache() -> None:
    """Forget the in-memory banks (the disk cache stays)."""
    _BANKS.clear()
