"""The adaptivity audit on toys whose answer is known: a planted input dependence is found, none is found where
the right bits do not depend on the input; oracle and learnable headroom on a menu with a planted winner."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from qpolicy import adaptivity
from qpolicy.banks import ReferenceBank


@dataclasses.dataclass
class TypedEngine:
    """errors_fn: final error of each image = |mean(bits_w) - 4 - 4 * type| where type (0 or 1) is written into the
    image's FP x_T; with ``depends=False`` the error ignores the type. S = 2 steps."""

    depends: bool = True

    def errors_fn(self, keys, traj, bw, ba):
        typ = traj[0, :, 0, 0, 0]
        target = 4.0 + 4.0 * typ if self.depends else 6.0
        e = jnp.abs(jnp.mean(bw.astype(jnp.float32)) - target)[None] + 0.01 * jnp.arange(typ.shape[0])
        return jnp.stack([e, e]), jnp.zeros((typ.shape[0], 1))


def _bank(types):
    N = len(types)
    traj = np.zeros((3, N, 2, 2, 1), np.float32)
    traj[0, :, 0, 0, 0] = types
    return ReferenceBank(name="toy", keys=jnp.arange(N), traj=jnp.asarray(traj))


def _groups(G, B=2, seed=0):
    rng = np.random.default_rng(seed)
    types = np.repeat(rng.integers(0, 2, G), B).astype(np.float32)
    idx = np.arange(G * B).reshape(G, B)
    bits = np.where(types[idx[:, 0]] > 0, 8, 4)[:, None, None] * np.ones((G, 2, 3), np.int64)
    return types, idx, bits


@pytest.mark.parametrize("depends", [True, False])
def test_permutation_audit_finds_planted_dependence_only(depends):
    G = 24
    types, idx, bits = _groups(G)
    eng, bank = TypedEngine(depends), _bank(types)
    matched = adaptivity.group_errors(eng, bank, idx, bits, bits, range(G))
    out = adaptivity.permutation_audit(eng, bank, idx, bits, bits, matched, k=4, seed=1)
    assert out["distinct_schedules"] == 2
    if depends:  # the right bits follow the type: other groups' schedules are worse
        assert out["gain"] > 1.0 and out["gain_ci"][0] > 0 and out["p_value"] < 0.01
    else:
        assert out["p_value"] > 0.05 and out["gain_ci"][0] <= 0 <= out["gain_ci"][1]


def test_oracle_and_learnable_headroom_on_a_planted_menu():
    rng = np.random.default_rng(0)
    N = 400
    feat = rng.standard_normal((N, 3))
    good_for_a = feat[:, 0] > 0  # entry "a" wins exactly where feature 0 is positive
    menu = {"a": np.where(good_for_a, 0.1, 1.0) + 0.01 * rng.random(N),
            "b": np.where(good_for_a, 1.0, 0.1) + 0.01 * rng.random(N)}
    learned = np.minimum(menu["a"], menu["b"])
    o = adaptivity.oracle_headroom(menu, learned)
    assert o["headroom_rel"] > 0.7 and o["captured"] == pytest.approx(1.0)
    ln = adaptivity.learnable_headroom(feat, menu)
    assert ln["vs_best_static"]["verdict"] == "better" and ln["share_of_headroom"] > 0.7
    noise = adaptivity.learnable_headroom(rng.standard_normal((N, 3)), menu)  # features that carry nothing
    assert noise["share_of_headroom"] < 0.3
    assert adaptivity.oracle_headroom({"a": menu["a"]}, learned)["headroom"] is None


def test_noise_floor_is_zero_for_identical_copies_and_matches_the_expected_min_of_noisy_ones():
    rng = np.random.default_rng(1)
    e = rng.random(2000) + 0.5
    same = adaptivity.noise_floor(np.stack([e, e, e]))
    assert same["distinct"] == 1 and same["headroom_rel"] == pytest.approx(0.0) and same["abs_diff_mean"] == 0
    # two copies = e + independent N(0, sigma²): E[min] = mean - sigma/sqrt(pi), so headroom ≈ sigma/sqrt(pi)/mean
    sigma = 0.1
    two = np.stack([e + sigma * rng.standard_normal(e.size), e + sigma * rng.standard_normal(e.size)])
    nf = adaptivity.noise_floor(np.concatenate([two, two[:1]]))  # a repeated copy counts once
    assert nf["copies"] == 3 and nf["distinct"] == 2
    assert nf["headroom_rel"] == pytest.approx(sigma / np.sqrt(np.pi) / e.mean(), rel=0.1)
    with pytest.raises(ValueError, match="copies must be"):
        adaptivity.noise_floor(e)


def _result(best_verdict, vs_mean, learned=0.010, mean=0.012, best=0.011):
    pol = [{"name": "learned_ppo_jax", "final_error": learned}, {"name": "learned_ppo_jax_mean_schedule",
                                                                 "final_error": mean},
           {"name": "search_evolution", "final_error": best}]
    return {"policies": pol, "adaptivity": {"vs_mean_schedule": {"verdict": vs_mean}},
            "best_baseline_at_matched_cost": {"name": "search_evolution", "verdict": best_verdict}}


@pytest.mark.parametrize("best_verdict, vs_mean, errs, policy, static", [
    ("better", "better", {}, "learned_ppo_jax", False),  # adaptivity pays: deploy the policy
    ("better", "no difference", {"mean": 0.0105}, "learned_ppo_jax_mean_schedule", True),  # only as a schedule
    ("worse", "no difference", {"learned": 0.03, "mean": 0.02, "best": 0.01}, "search_evolution", True),
    ("no difference", "better", {"learned": 0.011, "mean": 0.015, "best": 0.012}, "search_evolution", True),
    ("worse", "worse", {"learned": 0.03, "mean": 0.009, "best": 0.01}, "learned_ppo_jax_mean_schedule", True),
])
def test_recommendation_follows_the_ci_verdicts(best_verdict, vs_mean, errs, policy, static):
    from qpolicy.evaluation import recommend

    rec = recommend(_result(best_verdict, vs_mean, **errs))
    assert rec["policy"] == policy and rec["static"] is static
    if static and best_verdict != "better":
        assert "search_evolution at its cost" in rec["why"]
