"""Small statistics for evaluation reports: bootstrap intervals, paired policy comparisons, the adaptivity
(permutation) audit, and across-seed summaries. Pure numpy (scipy only for the Student-t quantile, optional).

* :func:`bootstrap_ci` - percentile bootstrap interval of the mean of 1-D samples.
* :func:`mean_ci` - mean, bootstrap interval and count as a dict.
* :func:`paired_difference` / :func:`verdict_text` - compare two policies' per-image errors on the same images
  (lower error is better) and put the verdict into words.
* :func:`derangements` / :func:`permutation_gain` - does an input-dependent bit schedule matter? Compare each
  group's error under its own schedule with its error under other groups' schedules.
* :func:`across_seeds` - mean and interval of one number over training seeds.

Every randomised function takes ``seed`` (an int or a ``np.random.Generator``); for a given int seed the result
is deterministic. Returned dicts hold plain Python floats / ints / lists, so they can be written as JSON.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .config import is_int, is_real

__all__ = [
    "EXACT_FLIP_MAX_GROUPS",
    "across_seeds",
    "bootstrap_ci",
    "derangements",
    "mean_ci",
    "paired_difference",
    "permutation_gain",
    "verdict_text",
]

EXACT_FLIP_MAX_GROUPS = 16  # permutation_gain enumerates all 2**G sign flips up to this many groups
_CHUNK_ELEMS = 1 << 21  # resampled values held at once (≈16 MiB of float64 + the same of int64 indices)
_MINUS = "\u2212"


# =========================================================================== input checks
def _check_level(level: Any) -> float:
    if not is_real(level) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level: expected a confidence level strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    return float(level)


def _check_count(v: Any, name: str, minimum: int = 1) -> int:
    if not is_int(v) or int(v) < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def _rng(seed: Any) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if is_int(seed) and int(seed) >= 0:
        return np.random.default_rng(int(seed))
    raise ValueError(f"seed: expected a non-negative int or a numpy.random.Generator, got {seed!r}")


def _as_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """``x`` as a finite float64 array with ``ndim`` dims and no empty axis; ValueError naming ``name`` otherwise."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a numeric array, could not convert ({e})") from None
    shape = "(N,)" if ndim == 1 else "(K, G)"
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array of shape {shape}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty (shape {arr.shape}); needs at least one value")
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise ValueError(f"{name}: contains {int(bad.sum())} non-finite value(s) (NaN or inf), first at index "
                         f"{where}; only finite values are accepted")
    return arr


# =========================================================================== bootstrap
def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) means of resamples (with replacement) of x (N,), drawn in chunks of at most _CHUNK_ELEMS values."""
    n = x.shape[0]
    chunk = max(1, min(n_boot, _CHUNK_ELEMS // n))
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start:start + m] = x[idx].mean(axis=1)
    return out


def bootstrap_ci(x: ArrayLike, *, level: float = 0.95, n_boot: int = 2000,
                 seed: int | np.random.Generator = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``x``.

    x: (N,) finite samples (any unit; the interval is in the same unit). level: in (0, 1). n_boot: number of
    resamples. seed: int or Generator. Returns (lo, hi), the (1 - level)/2 and (1 + level)/2 quantiles of the
    n_boot resample means. N == 1 gives (x0, x0) (no spread to estimate). The percentile interval is somewhat
    too narrow for small N (coverage a few points under ``level`` at N ≈ 20-50, worse below).
    """
    level = _check_level(level)
    n_boot = _check_count(n_boot, "n_boot")
    rng = _rng(seed)
    arr = _as_array(x, "x", 1)
    if arr.shape[0] == 1:
        return float(arr[0]), float(arr[0])
    means = _boot_means(arr, n_boot, rng)
    alpha = 1.0 - level
    lo, hi = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return float(lo), float(hi)


def mean_ci(x: ArrayLike, *, level: float = 0.95, n_boot: int = 2000,
            seed: int | np.random.Generator = 0) -> dict:
    """``{"mean", "ci": [lo, hi], "n", "level"}`` for samples x (N,): the sample mean and its
    :func:`bootstrap_ci` (same unit as x)."""
    arr = _as_array(x, "x", 1)
    lo, hi = bootstrap_ci(arr, level=level, n_boot=n_boot, seed=seed)
    return {"mean": float(arr.mean()), "ci": [lo, hi], "n": int(arr.shape[0]), "level": float(level)}


# =========================================================================== paired comparison
def paired_difference(a: ArrayLike, b: ArrayLike, *, level: float = 0.95, n_boot: int = 2000,
                      seed: int | np.random.Generator = 0) -> dict:
    """Compare two policies by their per-image errors on the SAME images (lower error is better).

    a, b: (N,) errors of policy A and policy B, element i on image i for both (N >= 2). Returns
    ``{"mean_diff": mean(a - b), "ci": [lo, hi] (bootstrap over images of the paired differences),
    "rel_diff": mean_diff / mean(b) (None when mean(b) == 0), "verdict", "n": N, "level"}``
    with verdict "better" (A has lower error: hi < 0), "worse" (lo > 0) or "no difference" (CI contains 0).
    mean_diff and ci are in the unit of the errors; rel_diff is a fraction (-0.11 = 11 % lower error).
    """
    a_arr = _as_array(a, "a", 1)
    b_arr = _as_array(b, "b", 1)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must have the same shape (per-image errors on the same images, in the same "
                         f"order): a has shape {a_arr.shape}, b has shape {b_arr.shape}")
    n = a_arr.shape[0]
    if n < 2:
        raise ValueError(f"a, b: a paired comparison needs at least 2 images, got N = {n}")
    d = a_arr - b_arr
    lo, hi = bootstrap_ci(d, level=level, n_boot=n_boot, seed=seed)
    mean_diff = float(d.mean())
    mean_b = float(b_arr.mean())
    verdict = "better" if hi < 0 else "worse" if lo > 0 else "no difference"
    return {"mean_diff": mean_diff, "ci": [lo, hi], "rel_diff": mean_diff / mean_b if mean_b != 0 else None,
            "verdict": verdict, "n": int(n), "level": float(level)}


def _fmt(v: float, decimals: int, signed: bool = False) -> str:
    s = f"{v:+.{decimals}f}" if signed else f"{v:.{decimals}f}"
    if float(s) == 0:  # no "-0.0000"
        s = s.lstrip("+-")
    return s.replace("-", _MINUS)


def verdict_text(d: dict, name_a: str, name_b: str) -> str:
    """One sentence for a :func:`paired_difference` result ``d``, e.g.
    "learned is better than search_evolution at 95 %: −0.0021 [−0.0035, −0.0008] (−11 %), n = 200"
    (mean difference A - B in error units, its interval, the relative difference, the number of images)."""
    missing = [k for k in ("mean_diff", "ci", "verdict") if k not in d]
    if missing:
        raise ValueError(f"d: expected a paired_difference() result, missing keys {missing}")
    if not isinstance(name_a, str) or not isinstance(name_b, str):
        raise ValueError(f"name_a, name_b: expected strings, got {name_a!r}, {name_b!r}")
    verdict = d["verdict"]
    if verdict == "better":
        head = f"{name_a} is better than {name_b}"
    elif verdict == "worse":
        head = f"{name_a} is worse than {name_b}"
    elif verdict == "no difference":
        head = f"no difference between {name_a} and {name_b}"
    else:
        raise ValueError(f"d: verdict must be 'better', 'worse' or 'no difference', got {verdict!r}")
    level = float(d.get("level", 0.95))
    mean_diff, (lo, hi) = float(d["mean_diff"]), (float(d["ci"][0]), float(d["ci"][1]))
    scale = max(abs(mean_diff), abs(lo), abs(hi))
    decimals = 4 if scale == 0 else int(min(8, max(2, 1 - math.floor(math.log10(scale)))))
    text = (f"{head} at {level * 100:g} %: {_fmt(mean_diff, decimals)} "
            f"[{_fmt(lo, decimals)}, {_fmt(hi, decimals)}]")
    rel = d.get("rel_diff")
    if rel is not None:
        text += f" ({_fmt(100 * float(rel), 0 if abs(rel) >= 0.095 else 1, signed=True)} %)"
    if "n" in d:
        text += f", n = {int(d['n'])}"
    return text


# =========================================================================== adaptivity audit
def derangements(G: int, K: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """K random derangements of G groups: (K, G) int64 array, each row a permutation of 0..G-1 with
    row[g] != g (uniform over derangements; rows drawn independently, so they may repeat, always for G = 2).

    Use row k as "group g is evaluated under the schedule of group row[g]". G >= 2, K >= 1.
    """
    G = _check_count(G, "G", 2)
    K = _check_count(K, "K", 1)
    rng = _rng(seed)
    rows: list[np.ndarray] = []
    have = 0
    base = np.arange(G)
    while have < K:  # rejection sampling: a uniform permutation is a derangement with probability ≈ 1/e
        need = K - have
        batch = min(max(8, 3 * need), max(8, _CHUNK_ELEMS // G))
        perms = rng.permuted(np.broadcast_to(base, (batch, G)), axis=1)
        ok = perms[~(perms == base).any(axis=1)][:need]
        rows.append(ok)
        have += ok.shape[0]
    return np.concatenate(rows, axis=0).astype(np.int64)


def _flip_signs(G: int, n_flips: int, rng: np.random.Generator):
    """Yield (m, G) float arrays of ±1: all 2**G sign vectors if G <= EXACT_FLIP_MAX_GROUPS, else n_flips random."""
    if G <= EXACT_FLIP_MAX_GROUPS:
        codes = np.arange(2 ** G, dtype=np.int64)[:, None]
        yield ((codes >> np.arange(G)) & 1) * 2.0 - 1.0
        return
    chunk = max(1, _CHUNK_ELEMS // G)
    for start in range(0, n_flips, chunk):
        m = min(chunk, n_flips - start)
        yield rng.integers(0, 2, size=(m, G)) * 2.0 - 1.0


def permutation_gain(matched: ArrayLike, permuted: ArrayLike, *, level: float = 0.95, n_boot: int = 2000,
                     n_flips: int = 10_000, seed: int | np.random.Generator = 0) -> dict:
    """Adaptivity audit: how much error does each group lose when run under another group's bit schedule?

    matched: (G,) error of group g's images under group g's own schedule.
    permuted: (K, G) error of group g's images under the schedule of group perm_k[g], for K derangements
    perm_k (see :func:`derangements`). Errors in any one unit (gain has that unit), lower is better, G >= 2.

    With per-group differences d_g = mean_k permuted[k, g] - matched[g], returns
    ``{"gain": mean(permuted) - mean(matched) (= mean_g d_g), "gain_ci": [lo, hi] (bootstrap over groups of d),
    "p_value", "p_method", "k": K, "groups": G, "level"}``. p_value is the one-sided sign-flip p for gain > 0:
    the fraction of sign vectors s with mean(s * d) >= mean(d); exact over all 2**G vectors when
    G <= EXACT_FLIP_MAX_GROUPS ("exact"; smallest possible p is 2**-G, so G >= 5 is needed to reach p < 0.05),
    otherwise from n_flips random vectors as (1 + hits) / (1 + n_flips) ("random"). The sign-flip null is
    "each d_g is symmetric about 0 and the groups are independent": exact when K = 1 and a group's matched and
    permuted errors are exchangeable, approximate for K > 1 with skewed errors or groups sharing schedules.
    """
    m = _as_array(matched, "matched", 1)
    p = _as_array(permuted, "permuted", 2)
    G = m.shape[0]
    if G < 2:
        raise ValueError(f"matched: needs at least 2 groups, got G = {G}")
    if p.shape[1] != G:
        raise ValueError(f"permuted: expected shape (K, G) = (K, {G}) to match matched (G,) = ({G},), "
                         f"got {p.shape}")
    level = _check_level(level)
    n_boot = _check_count(n_boot, "n_boot")
    n_flips = _check_count(n_flips, "n_flips")
    rng = _rng(seed)

    d = p.mean(axis=0) - m
    gain = float(d.mean())
    lo, hi = bootstrap_ci(d, level=level, n_boot=n_boot, seed=rng)
    observed = d.sum()
    tol = 1e-12 * max(float(np.abs(d).sum()), np.finfo(np.float64).tiny)  # ties count as >= (conservative)
    hits = total = 0
    for signs in _flip_signs(G, n_flips, rng):
        hits += int(np.count_nonzero(signs @ d >= observed - tol))
        total += signs.shape[0]
    exact = G <= EXACT_FLIP_MAX_GROUPS
    p_value = hits / total if exact else (1 + hits) / (1 + total)
    return {"gain": gain, "gain_ci": [lo, hi], "p_value": float(p_value), "p_method": "exact" if exact else "random",
            "k": int(p.shape[0]), "groups": int(G), "level": float(level)}


# =========================================================================== across seeds
def across_seeds(values: ArrayLike, *, level: float = 0.95, n_boot: int = 2000,
                 seed: int | np.random.Generator = 0) -> dict:
    """Summary of one number measured once per training seed.

    values: (S,) finite values (any unit), S >= 1. Returns ``{"mean", "std" (ddof=1; None for S = 1),
    "ci": [lo, hi], "method", "n": S, "values": [...], "level"}``. The interval is the Student-t interval
    mean ± t_{(1+level)/2, S-1} · std / sqrt(S) (method "t") when scipy is importable, else a percentile
    bootstrap (method "bootstrap", too narrow for few seeds). With S = 1 the interval is [v, v], method "none",
    and a "note" says there is no spread estimate.
    """
    level = _check_level(level)
    arr = _as_array(values, "values", 1)
    n = int(arr.shape[0])
    mean = float(arr.mean())
    out: dict[str, Any] = {"mean": mean, "std": None, "ci": [mean, mean], "method": "none", "n": n,
                           "values": [float(v) for v in arr], "level": level}
    if n == 1:
        out["note"] = "a single seed: no spread estimate, the interval is degenerate"
        return out
    std = float(arr.std(ddof=1))
    out["std"] = std
    try:
        from scipy.stats import t as student_t
    except ImportError:
        student_t = None
    if student_t is not None:
        half = float(student_t.ppf((1.0 + level) / 2.0, n - 1)) * std / math.sqrt(n)
        out["ci"], out["method"] = [mean - half, mean + half], "t"
    else:
        lo, hi = bootstrap_ci(arr, level=level, n_boot=n_boot, seed=seed)
        out["ci"], out["method"] = [lo, hi], "bootstrap"
    return out
