"""The adaptivity audit: does an input-dependent bit policy earn anything over static schedules?

Four measurements, all on the same eval images (errors = per-image final-sample error, lower is better):

* :func:`vs_mean_schedule` - the policy vs its own static (geometric-mean) schedule, paired over images.
* :func:`permutation_audit` - each group's schedule applied to other groups' images (K random derangements):
  ``gain`` = permuted − matched error, with a bootstrap CI and a sign-flip p-value (:func:`qpolicy.stats.
  permutation_gain`). A schedule that carries information about its input has gain > 0.
* :func:`oracle_headroom` - per image, the best of a menu of static schedules at the policy's cost vs the best
  single menu entry: the most an input-adaptive choice among them could gain (an upper bound that includes luck).
  ``captured`` = (best static − learned) / (best static − oracle).
* :func:`learnable_headroom` - the part of that headroom a deployable predictor reaches: a ridge model per menu
  entry maps what a deployed sampler sees of the input (x_T thumbnail features, never the FP reference) to the
  entry's error; fit on half the images, it picks an entry for each image of the other half.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from .banks import ReferenceBank
from .engine import QuantEngine, grouped_errors
from .stats import derangements, mean_ci, paired_difference, permutation_gain


def vs_mean_schedule(learned: np.ndarray, mean_schedule: np.ndarray, *, seed: int = 0) -> dict:
    """Paired difference learned − mean schedule of per-image final errors (N,)."""
    return paired_difference(learned, mean_schedule, seed=seed)


def group_errors(engine: QuantEngine, bank: ReferenceBank, idx: np.ndarray, bits_w: np.ndarray, bits_a: np.ndarray,
                 owners: Sequence[int]) -> np.ndarray:
    """(G,) mean final error of group g's images (bank indices idx[g], (G, B)) under the schedule of group
    owners[g] (bits (G, S, L))."""
    e, _ = grouped_errors(engine, bank, idx, bits_w, bits_a, owners)
    return e[-1].reshape(idx.shape).mean(1)


def permutation_audit(engine: QuantEngine, bank: ReferenceBank, idx: np.ndarray, bits_w: np.ndarray,
                      bits_a: np.ndarray, matched: np.ndarray, *, k: int = 4, seed: int = 0) -> dict:
    """Permutation test of input dependence: (G,) matched group errors vs the same groups under K derangements
    of the groups' schedules. Returns :func:`qpolicy.stats.permutation_gain`'s dict plus ``matched_mean``,
    ``permuted_mean`` and ``distinct_schedules`` (how many groups chose different schedules)."""
    G = idx.shape[0]
    flat = np.concatenate([bits_w.reshape(G, -1), bits_a.reshape(G, -1)], 1)
    distinct = int(len(np.unique(flat, axis=0)))
    if G < 2:
        return {"gain": None, "note": "needs at least 2 groups", "distinct_schedules": distinct}
    perms = derangements(G, k, seed)
    permuted = np.stack([group_errors(engine, bank, idx, bits_w, bits_a, perm) for perm in perms])
    out = permutation_gain(matched, permuted, seed=seed)
    out.update(matched_mean=float(np.mean(matched)), permuted_mean=float(permuted.mean()),
               distinct_schedules=distinct)
    return out


def oracle_headroom(menu: dict[str, np.ndarray], learned: np.ndarray, *, seed: int = 0) -> dict:
    """Per-image oracle over a menu of static schedules (name -> per-image final errors (N,), all at or below the
    learned policy's cost) vs the best single entry, and the share of it the learned policy captures."""
    if len(menu) < 2:
        return {"headroom": None, "note": f"a menu of >= 2 static schedules is needed, got {len(menu)}"}
    names = list(menu)
    E = np.stack([menu[k] for k in names])  # (M, N)
    best = int(np.argmin(E.mean(1)))
    oracle = E.min(0)
    best_mean, oracle_mean = float(E[best].mean()), float(oracle.mean())
    head = best_mean - oracle_mean
    gain = best_mean - float(np.mean(learned))
    corr = np.corrcoef(E) if E.shape[1] > 1 else np.ones((len(names), len(names)))
    off = corr[~np.eye(len(names), dtype=bool)]
    return {"menu": names, "best_static": names[best], "best_static_error": best_mean,
            "best_static_error_ci": mean_ci(E[best], seed=seed)["ci"], "oracle_error": oracle_mean,
            "oracle_error_ci": mean_ci(oracle, seed=seed)["ci"], "headroom": head,
            "headroom_rel": head / best_mean if best_mean > 0 else None,
            "learned_gain_over_best_static": gain,
            "captured": gain / head if head > 0 else None,
            "menu_error_correlation_mean": float(np.nanmean(off)) if off.size else None}


def noise_floor(copies: np.ndarray) -> dict:
    """The per-image oracle's noise floor: ``copies`` (C, N) are per-image final errors of ONE schedule computed C
    times with different float numerics (e.g. other batch sizes: other reduction orders flip roundings, and the
    sampler amplifies them). The per-image best of those copies vs their mean error is oracle headroom that no
    policy can choose, only luck; an oracle headroom over distinct schedules near or below it is not evidence of
    adaptivity. Returns copies, distinct (numerically different copies), headroom_rel, the copies' mean per-image
    correlation (distinct copies) and mean absolute per-image difference to the first copy."""
    E = np.asarray(copies, np.float64)
    if E.ndim != 2 or E.shape[0] < 2:
        raise ValueError(f"copies must be (C >= 2, N) per-image errors, got shape {E.shape}")
    _, first = np.unique(E.round(9), axis=0, return_index=True)
    D = E[np.sort(first)]  # the numerically distinct copies, each counted once
    mean = float(D.mean())
    corr = np.corrcoef(D)[np.triu_indices(len(D), 1)] if E.shape[1] > 1 and len(D) > 1 else np.ones(1)
    return {"copies": int(E.shape[0]), "distinct": int(len(D)),
            "headroom_rel": float(1 - D.min(0).mean() / mean) if mean > 0 else None,
            "correlation_mean": float(np.nanmean(corr)),
            "abs_diff_mean": float(np.abs(E[1:] - E[0]).mean())}


def ridge_fit(X: np.ndarray, y: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Ridge regression weights (D + 1,) of y (N,) on standardised-by-caller features X (N, D), bias unpenalised."""
    Xb = np.concatenate([X, np.ones((len(X), 1))], 1)
    reg = lam * np.eye(Xb.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(Xb.T @ Xb + reg, Xb.T @ y)


def learnable_headroom(features: np.ndarray, menu: dict[str, np.ndarray], *, lam: float = 1.0, seed: int = 0,
                       ) -> dict:
    """A deployable predictor's share of the oracle headroom: fit a ridge model per menu entry (features (N, D)
    -> that entry's per-image error) on a random half of the images, pick the entry with the lowest prediction for
    each image of the other half, and compare with the best single entry (chosen on the fitting half) there."""
    names = list(menu)
    N = features.shape[0]
    if len(names) < 2 or N < 8:
        return {"gain": None, "note": "needs >= 2 menu entries and >= 8 images"}
    E = np.stack([menu[k] for k in names])
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)
    fit, test = perm[: N // 2], perm[N // 2:]
    mu, sd = features[fit].mean(0), features[fit].std(0) + 1e-8
    Z = (features - mu) / sd
    W = np.stack([ridge_fit(Z[fit], E[m, fit], lam) for m in range(len(names))])  # (M, D + 1)
    pred = np.concatenate([Z[test], np.ones((len(test), 1))], 1) @ W.T  # (n_test, M)
    pick = pred.argmin(1)
    chosen = E[pick, test]
    best = int(np.argmin(E[:, fit].mean(1)))
    base = E[best, test]
    d = paired_difference(chosen, base, seed=seed)
    oracle = E[:, test].min(0)
    head = float(base.mean() - oracle.mean())
    return {"best_static": names[best], "best_static_error": float(base.mean()), "picked_error": float(chosen.mean()),
            "oracle_error": float(oracle.mean()), "vs_best_static": d,
            "gain_rel": float((base.mean() - chosen.mean()) / base.mean()) if base.mean() > 0 else None,
            "share_of_headroom": float((base.mean() - chosen.mean()) / head) if head > 0 else None,
            "pick_counts": {names[m]: int((pick == m).sum()) for m in range(len(names))},
            "fit_images": int(len(fit)), "test_images": int(len(test))}


def input_features(x: Any, thumb_size: int = 4) -> np.ndarray:
    """(N, D) features of initial noises x (N, H, W, C) a deployed sampler knows: thumbnail, mean, std, absmax."""
    from .metrics import thumbnail_features

    x = jnp.asarray(x)
    f = thumbnail_features(x, thumb_size)
    return np.asarray(jnp.concatenate([f, jnp.abs(x).max((1, 2, 3))[:, None]], 1), np.float64)


def by_request(cond: Any, keys: Any, learned_err: np.ndarray, learned_cost: np.ndarray,
               static_err: dict[str, np.ndarray]) -> dict[str, Any]:
    """A conditional model's evaluation split by guidance scale (the request that sets how much quantization error
    guidance amplifies): per scale, the images, the learned policy's mean BOPs/FP32 and final error with its CI, and
    each static schedule's final error on the same images (paired difference learned − static with its CI).
    An input-adaptive policy under a batch-mean budget should spend more where the scale is larger."""
    from .conditioning import request_table

    scale = request_table(cond, keys)["guidance"][: learned_err.shape[0]]
    rows = []
    for g in cond.guidance_scales:
        m = scale == g
        if m.sum() < 2:  # a CI needs two images
            continue
        row = {"guidance": float(g), "n": int(m.sum()), "learned_bops_rel_fp32": float(learned_cost[m].mean()),
               "learned_error": mean_ci(learned_err[m])}
        for name, e in static_err.items():
            row[f"{name}_error"] = float(e[m].mean())
            row[f"learned_vs_{name}"] = paired_difference(learned_err[m], e[m])
        rows.append(row)
    return {"scales": rows}
