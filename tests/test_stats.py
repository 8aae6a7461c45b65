"""Tests for qpolicy.stats: bootstrap coverage, paired verdicts, the permutation (adaptivity) audit, derangements,
across-seed summaries, input validation and determinism."""
from __future__ import annotations

import math
import sys
from collections import Counter

import numpy as np
import pytest

from qpolicy.stats import (
    across_seeds,
    bootstrap_ci,
    derangements,
    mean_ci,
    paired_difference,
    permutation_gain,
    verdict_text,
)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_coverage_of_known_mean():
    true_mean, covered, reps = 2.0, 0, 300
    data = np.random.default_rng(1234).normal(true_mean, 1.5, size=(reps, 50))
    for r in range(reps):
        lo, hi = bootstrap_ci(data[r], level=0.95, n_boot=1000, seed=r)
        assert lo <= data[r].mean() <= hi
        covered += lo <= true_mean <= hi
    assert 0.90 <= covered / reps <= 0.98


def test_bootstrap_matches_normal_theory_for_large_n():
    x = np.random.default_rng(5).normal(0.0, 1.0, 4000)
    lo, hi = bootstrap_ci(x, level=0.95, n_boot=4000, seed=0)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.15 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.15 * se)
    lo90, hi90 = bootstrap_ci(x, level=0.90, n_boot=4000, seed=0)
    assert lo < lo90 < hi90 < hi  # a lower level gives a narrower interval


def test_bootstrap_edge_cases_and_mean_ci():
    assert bootstrap_ci([3.25]) == (3.25, 3.25)
    lo, hi = bootstrap_ci(np.full(20, 0.5))
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    out = mean_ci([1.0, 2.0, 3.0, 4.0], seed=1)
    assert out["mean"] == 2.5 and out["n"] == 4 and out["level"] == 0.95
    assert 1.0 <= out["ci"][0] < 2.5 < out["ci"][1] <= 4.0
    # more resamples than one chunk holds gives the same kind of answer (chunking is internal)
    big = np.random.default_rng(0).normal(size=3000)
    lo, hi = bootstrap_ci(big, n_boot=1500, seed=0)
    assert lo < big.mean() < hi


def test_bootstrap_deterministic_for_seed():
    x = np.random.default_rng(7).exponential(size=40)
    assert bootstrap_ci(x, seed=11) == bootstrap_ci(x, seed=11)
    assert bootstrap_ci(x, seed=11) != bootstrap_ci(x, seed=12)
    assert bootstrap_ci(x, seed=np.random.default_rng(11)) == bootstrap_ci(x, seed=np.random.default_rng(11))


# --------------------------------------------------------------------------- paired difference
def _planted_pair(seed: int, n: int = 200):
    rng = np.random.default_rng(seed)
    a = rng.gamma(2.0, 0.5, n)
    b = a + 0.1 + rng.normal(0.0, 0.02, n)
    return a, b


def test_paired_planted_difference_both_directions():
    a, b = _planted_pair(0)
    d = paired_difference(a, b, seed=0)
    assert d["verdict"] == "better" and d["n"] == 200
    assert d["mean_diff"] == pytest.approx(np.mean(a - b))
    assert d["ci"][0] < d["mean_diff"] < d["ci"][1] < 0
    assert d["rel_diff"] == pytest.approx(d["mean_diff"] / b.mean())
    r = paired_difference(b, a, seed=0)
    assert r["verdict"] == "worse" and r["ci"][0] > 0
    assert r["mean_diff"] == pytest.approx(-d["mean_diff"])


def test_paired_no_difference_under_null():
    verdicts = []
    for s in range(20):
        rng = np.random.default_rng(100 + s)
        a, b = rng.normal(1.0, 0.2, 100), rng.normal(1.0, 0.2, 100)
        verdicts.append(paired_difference(a, b, seed=s)["verdict"])
    assert verdicts.count("no difference") >= 17
    assert paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["verdict"] == "no difference"


def test_paired_is_paired_not_independent():
    # a large per-image spread shared by a and b: only pairing detects the small constant gap
    rng = np.random.default_rng(3)
    base = rng.lognormal(0.0, 1.0, 60)
    d = paired_difference(base - 0.01, base, seed=0)
    assert d["verdict"] == "better"
    assert d["ci"][1] - d["ci"][0] < 1e-9


def test_verdict_text():
    d = {"mean_diff": -0.0021, "ci": [-0.0035, -0.0008], "rel_diff": -0.11, "verdict": "better", "n": 200,
         "level": 0.95}
    text = verdict_text(d, "learned", "search_evolution")
    assert text.startswith("learned is better than search_evolution at 95 %: ")
    assert "\u22120.0021 [\u22120.0035, \u22120.0008] (\u221211 %)" in text
    assert "n = 200" in text
    worse = verdict_text({**d, "verdict": "worse", "mean_diff": 0.0021, "ci": [0.0008, 0.0035], "rel_diff": 0.11},
                         "learned", "uniform8")
    assert worse.startswith("learned is worse than uniform8 at 95 %: 0.0021 [0.0008, 0.0035] (+11 %)")
    same = verdict_text({**d, "verdict": "no difference", "ci": [-0.004, 0.001], "rel_diff": None}, "x", "y")
    assert same.startswith("no difference between x and y at 95 %") and "%)" not in same
    real = paired_difference(*_planted_pair(1), seed=0)
    assert verdict_text(real, "a", "b").startswith("a is better than b at 95 %: \u2212")
    with pytest.raises(ValueError, match="d: .*missing keys"):
        verdict_text({"verdict": "better"}, "a", "b")
    with pytest.raises(ValueError, match="d: verdict"):
        verdict_text({**d, "verdict": "maybe"}, "a", "b")


def test_paired_deterministic_for_seed():
    a, b = _planted_pair(2, n=50)
    assert paired_difference(a, b, seed=4) == paired_difference(a, b, seed=4)


# --------------------------------------------------------------------------- derangements
def test_derangements_are_permutations_without_fixed_points():
    for G in (2, 3, 7, 40):
        P = derangements(G, 25, seed=G)
        assert P.shape == (25, G) and np.issubdtype(P.dtype, np.integer)
        assert (np.sort(P, axis=1) == np.arange(G)).all()
        assert not (P == np.arange(G)).any()
    assert (derangements(2, 3, seed=0) == [[1, 0]] * 3).all()
    assert (derangements(9, 5, seed=3) == derangements(9, 5, seed=3)).all()
    assert not (derangements(9, 5, seed=3) == derangements(9, 5, seed=4)).all()


def test_derangements_roughly_uniform():
    counts = Counter(map(tuple, derangements(4, 9000, seed=0)))
    assert len(counts) == 9  # D(4) = 9 derangements of 4 elements
    assert all(800 <= c <= 1200 for c in counts.values())


# --------------------------------------------------------------------------- permutation gain
def _typed_groups(seed: int, G: int, K: int, effect: float):
    """Toy audit: group g has type g % 2; a schedule made for the other type costs ``effect`` extra error."""
    rng = np.random.default_rng(seed)
    typ = np.arange(G) % 2
    matched = 1.0 + rng.normal(0.0, 0.05, G)
    perm = derangements(G, K, seed=seed)
    permuted = 1.0 + effect * (typ[perm] != typ[None, :]) + rng.normal(0.0, 0.05, (K, G))
    return matched, permuted


@pytest.mark.parametrize("G, method", [(12, "exact"), (24, "random")])
def test_permutation_detects_input_dependence(G, method):
    matched, permuted = _typed_groups(0, G, K=8, effect=0.5)
    out = permutation_gain(matched, permuted, seed=0)
    assert out["gain"] == pytest.approx(permuted.mean() - matched.mean())
    assert out["gain"] > 0 and out["gain_ci"][0] > 0
    assert out["p_value"] < 0.05 and out["p_method"] == method
    assert out["k"] == 8 and out["groups"] == G
    if method == "exact":
        assert out["p_value"] == pytest.approx(2.0 ** -G)  # every d_g > 0: only the identity flip ties
    else:
        assert out["p_value"] == pytest.approx(1 / 10_001)


def test_permutation_no_dependence_gives_large_p():
    G, K = 10, 8
    pvals = []
    for s in range(30):
        rng = np.random.default_rng(500 + s)
        matched, permuted = rng.normal(1.0, 0.1, G), rng.normal(1.0, 0.1, (K, G))
        out = permutation_gain(matched, permuted, seed=s)
        assert out["gain_ci"][0] <= out["gain"] <= out["gain_ci"][1]
        pvals.append(out["p_value"])
    pvals = np.array(pvals)
    assert pvals[0] > 0.05
    assert np.mean(pvals < 0.05) <= 0.2
    assert 0.2 <= np.mean(pvals < 0.5) <= 0.8
    # no effect in the typed toy either
    assert permutation_gain(*_typed_groups(1, 12, K=8, effect=0.0), seed=0)["p_value"] > 0.05


def test_permutation_exact_p_small_case():
    # d = [1, 2, -0.5], observed sum 2.5: of the 8 sign vectors only (+,+,+) and (+,+,-) reach it, so p = 2/8
    out = permutation_gain([0.0, 0.0, 0.5], [[1.0, 2.0, 0.0]])
    assert out["gain"] == pytest.approx(2.5 / 3)
    sums = [s1 * 1 + s2 * 2 + s3 * -0.5 for s1 in (1, -1) for s2 in (1, -1) for s3 in (1, -1)]
    assert sum(v >= 2.5 for v in sums) == 2
    assert out["p_value"] == pytest.approx(0.25)


def test_permutation_deterministic_for_seed():
    matched, permuted = _typed_groups(2, 20, K=4, effect=0.05)
    assert permutation_gain(matched, permuted, seed=9) == permutation_gain(matched, permuted, seed=9)


# --------------------------------------------------------------------------- across seeds
def test_across_seeds_t_interval():
    from scipy.stats import t

    vals = [0.31, 0.29, 0.35, 0.30]
    out = across_seeds(vals)
    m, s = np.mean(vals), np.std(vals, ddof=1)
    half = t.ppf(0.975, 3) * s / 2.0
    assert out["method"] == "t" and out["n"] == 4 and out["values"] == vals
    assert out["mean"] == pytest.approx(m) and out["std"] == pytest.approx(s)
    assert out["ci"] == pytest.approx([m - half, m + half])


def test_across_seeds_single_value_and_bootstrap_fallback(monkeypatch):
    one = across_seeds([0.7])
    assert one["ci"] == [0.7, 0.7] and one["n"] == 1 and "note" in one and one["std"] is None
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # scipy.stats not importable
    out = across_seeds([1.0, 2.0, 3.0, 4.0, 5.0], seed=0)
    assert out["method"] == "bootstrap"
    assert 1.0 <= out["ci"][0] < 3.0 < out["ci"][1] <= 5.0
    assert out == across_seeds([1.0, 2.0, 3.0, 4.0, 5.0], seed=0)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call, match", [
    (lambda: paired_difference([1.0, 2.0, 3.0], [1.0, 2.0]), r"a and b must have the same shape"),
    (lambda: paired_difference([1.0], [2.0]), r"a, b: .*at least 2"),
    (lambda: paired_difference([1.0, np.nan], [1.0, 2.0]), r"a: .*non-finite"),
    (lambda: bootstrap_ci([]), r"x: empty"),
    (lambda: bootstrap_ci([1.0, np.nan, 2.0]), r"x: .*non-finite"),
    (lambda: bootstrap_ci([1.0, np.inf]), r"x: .*non-finite"),
    (lambda: bootstrap_ci([[1.0, 2.0]]), r"x: expected a 1-D"),
    (lambda: bootstrap_ci(["a", "b"]), r"x: expected a numeric"),
    (lambda: bootstrap_ci([1.0, 2.0], level=1.5), r"level: .*between 0 and 1"),
    (lambda: bootstrap_ci([1.0, 2.0], level=0.0), r"level"),
    (lambda: bootstrap_ci([1.0, 2.0], n_boot=0), r"n_boot"),
    (lambda: bootstrap_ci([1.0, 2.0], seed=-1), r"seed"),
    (lambda: mean_ci([]), r"x: empty"),
    (lambda: derangements(1, 5), r"G: expected an integer >= 2"),
    (lambda: derangements(4, 0), r"K: expected an integer >= 1"),
    (lambda: permutation_gain([1.0], [[1.0]]), r"matched: .*at least 2 groups"),
    (lambda: permutation_gain([1.0, 2.0], [1.0, 2.0]), r"permuted: expected a 2-D"),
    (lambda: permutation_gain([1.0, 2.0], [[1.0, 2.0, 3.0]]), r"permuted: expected shape \(K, G\)"),
    (lambda: permutation_gain([1.0, np.nan], [[1.0, 2.0]]), r"matched: .*non-finite"),
    (lambda: permutation_gain([1.0, 2.0], [[1.0, 2.0]], level=1.5), r"level"),
    (lambda: across_seeds([]), r"values: empty"),
    (lambda: across_seeds([0.1, 0.2], level=1.5), r"level"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
