"""Non-RL baselines: ILP vs brute force, known optimum, budgets, monotone ramps, search elitism, repair; beam search,
timestep bisection and first_last_n against brute force on an additive toy, evaluation caps and compute counts."""
from __future__ import annotations

import dataclasses
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpolicy.agents import baselines as B
from qpolicy.agents import sensitivity
from qpolicy.cost import CostModel
from qpolicy.engine import QuantConfig

BUDGET = 0.03


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny():
    from qpolicy.denoiser import wrap_denoiser
    from qpolicy.diffusion import make_schedule
    from qpolicy.models import init_unet, preset_config
    from qpolicy.banks import reference_bank
    from qpolicy.engine import make_engine

    cfg = preset_config("tiny", image_size=8, in_channels=1)
    module, params = init_unet(cfg, jax.random.key(0))
    den = wrap_denoiser(module, {"params": params}, image_shape=(8, 8, 1),
                        schedule=make_schedule("linear", 100), name="tiny")
    eng = make_engine(den, steps=3)
    bank = reference_bank(eng, "train", 8, disk_cache=False)
    return eng, bank


@pytest.fixture(scope="module")
def all_bl(tiny):
    eng, bank = tiny
    return B.all_baselines(eng, bank, BUDGET, progress=False,
                           search_kwargs={"generations": 3, "population": 4})


@dataclasses.dataclass
class _StubEngine:
    """Duck-typed engine for the static problem: layers with given MACs, a small choice set."""

    macs: tuple
    choices: tuple
    num_steps: int = 2

    @property
    def num_layers(self):
        return len(self.macs)

    @property
    def qcfg(self):
        return QuantConfig(bit_choices=self.choices)

    def cost_model(self):
        m = np.asarray(self.macs, np.float64)
        return CostModel(macs=m, params=m, bit_choices=self.choices)


def _brute_force(eng, sens, budget):
    cm = eng.cost_model()
    best = None
    for combo in itertools.product(range(len(eng.choices)), repeat=eng.num_layers):
        bits = np.array([eng.choices[c] for c in combo])
        if cm.summary(bits, bits)["bops_rel_fp32"] > budget * (1 + 1e-9):
            continue
        obj = sum(sens[l, c] for l, c in enumerate(combo))
        if best is None or obj < best[0]:
            best = (obj, bits)
    return best


# ------------------------------------------------------------------------------------------ static ILP
def test_ilp_equals_brute_force_and_respects_budget():
    eng = _StubEngine(macs=(100.0, 300.0, 50.0), choices=(2, 4, 8))
    sens = np.array([[5.0, 1.0, 0.0],
                     [9.0, 2.0, 0.0],
                     [1.0, 0.5, 0.0]])
    cm = eng.cost_model()
    for budget in (16 / 1024 + 1e-4, 0.03, 40 / 1024, 0.05):
        bl = B.sensitivity_mixed_precision(eng, sens, budget)
        assert bl.name == "sensitivity_ilp" and bl.info["solver"] == "milp"
        assert bl.bits_w.shape == (2, 3) and (bl.bits_w == bl.bits_w[0]).all() and bl.tied
        cost = cm.summary(bl.bits_w, bl.bits_a)["bops_rel_fp32"]
        assert cost <= budget * (1 + 1e-9)
        obj, bits = _brute_force(eng, sens, budget)
        assert bl.info["objective"] == pytest.approx(obj)
        np.testing.assert_array_equal(bl.bits_w[0], bits)


def test_ilp_matches_brute_force_on_random_tables():
    rng = np.random.default_rng(0)
    eng = _StubEngine(macs=(100.0, 300.0, 50.0), choices=(2, 4, 8))
    for _ in range(10):
        sens = np.sort(rng.random((3, 3)), axis=1)[:, ::-1].copy()
        budget = float(rng.uniform(4 / 1024, 64 / 1024))
        bl = B.sensitivity_mixed_precision(eng, sens, budget)
        assert bl.info["objective"] == pytest.approx(_brute_force(eng, sens, budget)[0])


def test_greedy_fallback_respects_budget(monkeypatch):
    eng = _StubEngine(macs=(100.0, 300.0, 50.0), choices=(2, 4, 8))
    sens = np.array([[5.0, 1.0, 0.0], [9.0, 2.0, 0.0], [1.0, 0.5, 0.0]])
    bl = B.sensitivity_mixed_precision(eng, sens, 0.03, solver="greedy")
    assert bl.name == "sensitivity_greedy"
    assert B.schedule_cost(eng, bl.bits_w, bl.bits_a) <= 0.03
    monkeypatch.setattr(sensitivity, "_solve_milp", lambda *a, **k: None)  # milp unavailable / failed
    bl = B.sensitivity_mixed_precision(eng, sens, 0.03)
    assert bl.info["solver"] == "greedy" and B.schedule_cost(eng, bl.bits_w, bl.bits_a) <= 0.03


def test_insensitive_layer_gets_fewest_bits(tiny):
    eng, _ = tiny
    L, C = eng.num_layers, len(eng.qcfg.bit_choices)
    rng = np.random.default_rng(1)
    decay = 2.0 ** -np.arange(C)  # penalty halves with each extra bit choice
    sens = (1.0 + rng.random((L, 1))) * decay[None]
    sens[:, -1] = 0.0
    k = int(np.argmax(eng.cost_model().macs))  # the most expensive layer does not care
    sens[k] = 0.0
    for solver in ("milp", "greedy"):
        bl = B.sensitivity_mixed_precision(eng, sens, BUDGET, solver=solver)
        assert B.schedule_cost(eng, bl.bits_w, bl.bits_a) <= BUDGET
        assert (bl.bits_w[:, k] == eng.qcfg.bit_choices[0]).all()
        assert bl.bits_w[0].mean() > eng.qcfg.bit_choices[0]


def test_bad_sensitivity_shape(tiny):
    eng, _ = tiny
    with pytest.raises(ValueError, match="sens must be"):
        B.sensitivity_mixed_precision(eng, np.zeros((3, 3)), BUDGET)


# ------------------------------------------------------------------------------------------ all baselines
def test_all_baselines_shapes_choices_budget(tiny, all_bl):
    eng, _ = tiny
    S, L = eng.num_steps, eng.num_layers
    names = [b.name for b in all_bl]
    assert names[0].startswith("uniform_")
    for n in ("sensitivity_ilp", "timestep_ramp_up", "timestep_ramp_down", "search_evolution", "random"):
        assert n in names
    uniform = [b for b in all_bl if b.name.startswith("uniform_")]
    assert 1 <= len(uniform) <= 20 and "uniform_w4a8" in names and "uniform_w8a8" in names
    for b in all_bl:
        assert b.bits_w.shape == (S, L) and b.bits_a.shape == (S, L), b.name
        assert b.bits_w.dtype == np.int32 and b.bits_a.dtype == np.int32
        assert np.isin(b.bits_w, eng.qcfg.bit_choices).all() and np.isin(b.bits_a, eng.qcfg.bit_choices).all()
        if not b.name.startswith("uniform_"):
            assert B.schedule_cost(eng, b.bits_w, b.bits_a) <= BUDGET * (1 + 1e-9), b.name
            assert (b.tied or b.name == "first_last_n") and b.info["budget"] == BUDGET  # first_last_n: W != A by design
            assert "seconds" in b.info


def test_timestep_ramps_monotone(all_bl):
    by = {b.name: b for b in all_bl}
    up, down = by["timestep_ramp_up"].bits_w, by["timestep_ramp_down"].bits_w
    assert (up == up[:, :1]).all() and (down == down[:, :1]).all()  # all layers share a step's bits
    assert (np.diff(up[:, 0]) >= 0).all()
    assert (np.diff(down[:, 0]) <= 0).all()


def test_search_never_worse_than_initial_population(tiny, all_bl):
    eng, bank = tiny
    s = {b.name: b for b in all_bl}["search_evolution"]
    assert s.info["best_score"] <= s.info["init_best_score"] + 1e-12
    seeds = [b for b in all_bl if b.name in ("sensitivity_ilp", "timestep_ramp_up", "timestep_ramp_down")]
    fin, trj = B.train_scores(eng, bank, [(b.bits_w, b.bits_a) for b in [s] + seeds])
    score = fin + B.TRAJ_TIE * trj
    assert score[0] <= score[1:].min() + 1e-9
    assert score[0] == pytest.approx(s.info["best_score"], rel=1e-5)


def test_sensitivity_table(tiny):
    eng, bank = tiny
    ch = eng.qcfg.bit_choices
    sens, info = B.layer_sensitivity(eng, bank, probe_bits=(2, 4), return_info=True)
    assert sens.shape == (eng.num_layers, len(ch)) and (sens >= 0).all()
    assert info["probes"] == 1 + 2 * eng.num_layers
    assert (np.diff(sens, axis=1) <= 1e-12).all()  # monotone: more bits never look worse
    assert (sens[:, [i for i, b in enumerate(ch) if b >= 8]] == 0).all()


# ------------------------------------------------------------------------------------------ repair / random
def test_budget_repair(tiny):
    eng, _ = tiny
    S, L = eng.num_steps, eng.num_layers
    ch = eng.qcfg.bit_choices
    rng = np.random.default_rng(0)
    bw = np.asarray(ch)[rng.integers(len(ch), size=(S, L))]
    for prio in (None, np.tile(np.linspace(1, 0, len(ch)), (L, 1))):
        w, a = B.budget_repair(eng, bw, bw, BUDGET, prio)
        assert B.schedule_cost(eng, w, a) <= BUDGET and (w == a).all() and (w <= bw).all()
    ba = np.asarray(ch)[rng.integers(len(ch), size=(S, L))]
    w, a = B.budget_repair(eng, bw, ba, BUDGET)  # untied stays untied, still within budget
    assert B.schedule_cost(eng, w, a) <= BUDGET and (w <= bw).all() and (a <= ba).all()
    # Already within budget: unchanged.
    lo = np.full((S, L), 4)
    np.testing.assert_array_equal(B.budget_repair(eng, lo, lo, BUDGET)[0], lo)
    # A layer with no penalty is lowered first.
    prio = np.ones((L, len(ch))) * np.linspace(1, 0, len(ch))
    prio[5] = 0
    w, _ = B.budget_repair(eng, np.full((S, L), 8), np.full((S, L), 8), 0.06, prio)
    assert (w[:, 5] < 8).all()


def test_budget_below_minimum_raises(tiny):
    eng, _ = tiny
    S, L = eng.num_steps, eng.num_layers
    b = np.full((S, L), 8)
    minimum = B.schedule_cost(eng, np.full((S, L), 2), np.full((S, L), 2))
    with pytest.raises(ValueError, match=r"budget=.*minimum achievable cost") as ei:
        B.budget_repair(eng, b, b, minimum / 2)
    assert f"{minimum:.6g}" in str(ei.value)
    with pytest.raises(ValueError, match="budget"):
        B.random_schedule(eng, minimum / 2)
    w, a = B.budget_repair(eng, b, b, minimum)  # exactly the minimum is achievable
    assert (w == 2).all()


def test_random_schedule(tiny):
    eng, _ = tiny
    r1, r2 = B.random_schedule(eng, BUDGET, seed=1), B.random_schedule(eng, BUDGET, seed=2)
    assert r1.name == "random" and B.schedule_cost(eng, r1.bits_w, r1.bits_a) <= BUDGET
    assert not np.array_equal(r1.bits_w, r2.bits_w)
    np.testing.assert_array_equal(B.random_schedule(eng, BUDGET, seed=1).bits_w, r1.bits_w)
    u = B.random_schedule(eng, BUDGET, seed=1, tie=False)
    assert not u.tied and B.schedule_cost(eng, u.bits_w, u.bits_a) <= BUDGET


def test_uniform_baselines_pairs(tiny):
    eng, _ = tiny
    bl = B.uniform_baselines(eng, pairs=[(4, 8), (4, 8), (6, 6)])
    assert [b.name for b in bl] == ["uniform_w4a8", "uniform_w6a6"]
    assert (bl[0].bits_w == 4).all() and (bl[0].bits_a == 8).all()
    with pytest.raises(ValueError, match="accepted"):
        B.uniform_baselines(eng, pairs=[(7, 7)])


@pytest.mark.slow
def test_vmapped_scores_match_loop(tiny):
    """The accelerator path (vmapped chunks, padded) agrees with the loop on well-conditioned schedules."""
    eng, bank = tiny
    S, L = eng.num_steps, eng.num_layers
    sc = [(np.full((S, L), b, np.int32),) * 2 for b in (4, 8, 16)]
    f1, t1 = B.train_scores(eng, bank, sc, chunk=1)
    f2, t2 = B.train_scores(eng, bank, sc, chunk=2)
    # batched convolutions sum in another order; at 4 bits a few codes flip and the sampler amplifies it (0.35 %
    # measured with the ptq engine)
    np.testing.assert_allclose(f2, f1, rtol=1e-2, atol=1e-8)
    np.testing.assert_allclose(t2, t1, rtol=1e-2, atol=1e-8)


# ------------------------------------------------------------------------------------------ beam / bisection / first_last_n
from qpolicy.agents import search as search_mod  # noqa: E402

NEW = ("search_beam", "timestep_bisection", "first_last_n")
TOY_BANK = types.SimpleNamespace(size=4)  # only its size is read when a scorer is given


def _additive_toy(seed, S=2, macs=(100.0, 300.0), choices=(2, 4, 8)):
    """Stub engine + a scorer whose final error is additive over (step, layer): pw[t, l, c_w] + pa[t, l, c_a],
    each penalty decreasing in the choice (0 at the top), magnitudes spread over two decades."""
    rng = np.random.default_rng(seed)
    eng = _StubEngine(macs=macs, choices=choices, num_steps=S)
    L, C = len(macs), len(choices)

    def penalties():
        inc = rng.random((S, L, C)) * rng.choice([0.1, 1.0, 10.0], size=(S, L, 1))
        return np.cumsum(inc[..., ::-1], -1)[..., ::-1] - inc[..., -1:]

    pw, pa = penalties(), penalties()
    lut = {b: i for i, b in enumerate(choices)}
    t, l = np.meshgrid(np.arange(S), np.arange(L), indexing="ij")
    calls = []

    def err(iw, ia):
        return float(pw[t, l, iw].sum() + pa[t, l, ia].sum())

    def scorer(scheds):
        calls.append(len(scheds))
        idx = [(np.vectorize(lut.get)(np.asarray(w)), np.vectorize(lut.get)(np.asarray(a))) for w, a in scheds]
        return np.array([err(*p) for p in idx]), np.zeros(len(idx))

    return eng, scorer, err, calls


def _toy_cost(eng, iw, ia):
    ch = np.asarray(eng.choices)
    return eng.cost_model().summary(ch[iw], ch[ia])["bops_rel_fp32"]


def _toy_budget(eng, seed, hi):
    lo = _toy_cost(eng, np.zeros((eng.num_steps, eng.num_layers), int), np.zeros((eng.num_steps, eng.num_layers), int))
    return float(np.random.default_rng(100 + seed).uniform(lo, hi))


def _brute(eng, err, budget, members):
    best = None
    for iw, ia in members:
        if _toy_cost(eng, iw, ia) > budget * (1 + 1e-9):
            continue
        e = err(iw, ia)
        if best is None or e < best - 1e-12:
            best = e
    return best


@pytest.mark.parametrize("seed", range(6))
def test_new_searches_find_known_optimum_of_additive_toy(seed):
    eng, scorer, err, _ = _additive_toy(seed)
    S, L, C = 2, 2, 3
    budget = _toy_budget(eng, seed, 64 / 1024)
    tied = lambda iw: (iw, iw)
    # beam search: the optimum over all 3^4 tied (step, layer) schedules
    full = [tied(np.array(c).reshape(S, L)) for c in itertools.product(range(C), repeat=S * L)]
    bl = B.search_beam(eng, TOY_BANK, budget, scorer=scorer)
    assert bl.name == "search_beam" and bl.tied and bl.info["cost"] <= budget * (1 + 1e-9)
    assert bl.info["train_final_error"] == pytest.approx(_brute(eng, err, budget, full), abs=1e-12)
    # timestep bisection: the optimum of the per-step family (every layer shares a step's bits)
    per_step = [tied(np.repeat(np.array(p)[:, None], L, 1)) for p in itertools.product(range(C), repeat=S)]
    bt = B.timestep_bisection(eng, TOY_BANK, budget, scorer=scorer)
    assert bt.name == "timestep_bisection" and bt.tied and bt.info["cost"] <= budget * (1 + 1e-9)
    assert (bt.bits_w == bt.bits_w[:, :1]).all()
    assert bt.info["train_final_error"] == pytest.approx(_brute(eng, err, budget, per_step), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_first_last_n_finds_optimum_of_its_family(seed):
    eng, scorer, err, _ = _additive_toy(seed, S=5, choices=(2, 4, 8, 16, 32))
    S, L, C = 5, 2, 5
    budget = _toy_budget(eng, seed, 0.15)
    family = []
    for n in range(S // 2 + 1):  # n first + n last steps at A16 (index 3), base elsewhere; highest base that fits
        for c in range(C - 1, -1, -1):
            iw = np.full((S, L), c)
            ia = iw.copy()
            ia[list(range(n)) + list(range(S - n, S))] = max(3, c)
            if _toy_cost(eng, iw, ia) <= budget * (1 + 1e-9):
                family.append((iw, ia))
                break
    bl = B.first_last_n(eng, TOY_BANK, budget, scorer=scorer)
    assert bl.name == "first_last_n" and bl.info["cost"] <= budget * (1 + 1e-9)
    assert bl.info["train_final_error"] == pytest.approx(_brute(eng, err, budget, family), abs=1e-12)
    n, base, high = bl.info["n"], bl.info["base"], bl.info["high"]
    assert (bl.bits_w == base).all() and high == max(16, base)
    edge = np.zeros(S, bool)
    edge[:n] = True
    edge[S - n:] = True
    assert (bl.bits_a[edge] == high).all() and (bl.bits_a[~edge] == base).all()
    assert bl.info["evaluations"] == len(bl.info["family"]) <= S // 2 + 1


@pytest.mark.parametrize("cap", [0, 1, 2, 5, 9, 30])
def test_max_evaluations_caps_and_forwards(cap):
    for name in NEW:
        eng, scorer, _, calls = _additive_toy(1, S=4, macs=(100.0, 300.0, 50.0))
        budget = _toy_budget(eng, 1, 64 / 1024)
        bl = getattr(B, name)(eng, TOY_BANK, budget, scorer=scorer, max_evaluations=cap)
        assert bl.info["evaluations"] <= cap and sum(calls) == bl.info["evaluations"], name
        assert bl.info["forwards"] == bl.info["evaluations"] * TOY_BANK.size * eng.num_steps, name
        assert bl.info["cost"] <= budget * (1 + 1e-9) and bl.info["max_evaluations"] == cap, name
        assert np.isin(bl.bits_w, eng.choices).all() and np.isin(bl.bits_a, eng.choices).all(), name
        uncapped = getattr(B, name)(eng, TOY_BANK, budget, scorer=scorer)
        assert uncapped.info["forwards"] == uncapped.info["evaluations"] * TOY_BANK.size * eng.num_steps
        if cap >= uncapped.info["evaluations"]:
            assert bl.info["evaluations"] == uncapped.info["evaluations"] and not bl.info["capped"], name
        if cap >= 2 and name != "first_last_n":  # never worse than the uniform schedule at budget
            u = search_mod.uniform_at_budget(eng, eng.cost_model().table(), budget)
            ub = np.asarray(eng.choices)[u]
            assert bl.info["best_score"] <= scorer([(ub, ub)])[0][0] + 1e-12, name
    with pytest.raises(ValueError, match="max_evaluations"):
        B.search_beam(eng, TOY_BANK, budget, scorer=scorer, max_evaluations=-1)


def test_all_baselines_new_searches_and_compute(tiny, all_bl):
    eng, bank = tiny
    S = eng.num_steps
    names = [b.name for b in all_bl]
    i = names.index("search_evolution")
    assert names[i + 1:i + 4] == list(NEW) and names[-1] == "random"
    for b in all_bl:
        assert b.info["evaluations"] >= 0 and b.info["forwards"] >= 0, b.name
    for b in all_bl:
        if b.name in NEW + ("search_evolution", "timestep_ramp_up"):
            # the evolution starts from the shared sensitivity table and is charged its probes too
            extra = (b.info["sensitivity_forwards"] + b.info["init_forwards"]) if b.name == "search_evolution" else 0
            assert b.info["forwards"] == b.info["evaluations"] * bank.size * S + extra, b.name
            assert b.info["evaluations"] > 0, b.name
    by = {b.name: b for b in all_bl}
    ilp = by["sensitivity_ilp"].info
    assert ilp["forwards"] == ilp["sensitivity"]["probes"] * ilp["sensitivity"]["images"] * S
    assert by["search_evolution"].info["sensitivity_forwards"] == ilp["forwards"]
    assert by["search_evolution"].info["init_forwards"] == by["timestep_ramp_up"].info["forwards"]

    fl = by["first_last_n"]
    assert (fl.bits_w == fl.info["base"]).all() and (fl.bits_a >= fl.bits_w).all()
    # the searches score schedules they report: check the beam's and bisection's claimed scores
    sc = [by[n] for n in ("search_beam", "timestep_bisection")]
    fin, trj = B.train_scores(eng, bank, [(b.bits_w, b.bits_a) for b in sc])
    for b, f in zip(sc, fin):
        assert f == pytest.approx(b.info["train_final_error"], rel=1e-5)


def test_grouped_errors_chunks_match_the_loop(tiny):
    """Image groups under their owners' schedules: vmapped, padded chunks agree with one call per group, and
    owners pick whose schedule each group runs."""
    from qpolicy.engine import grouped_errors

    eng, bank = tiny
    S, L = eng.num_steps, eng.num_layers
    idx = np.arange(6).reshape(3, 2)
    bits = np.stack([np.full((S, L), b, np.int32) for b in (8, 16, 8)])
    owners = [1, 2, 0]
    e1, x1 = grouped_errors(eng, bank, idx, bits, bits, owners, chunk=1)
    e2, x2 = grouped_errors(eng, bank, idx, bits, bits, owners, chunk=2)  # 2 chunks, the last one padded
    assert e1.shape == (S, 6) and x1.shape == (6, 8, 8, 1)
    np.testing.assert_allclose(e2, e1, rtol=1e-2, atol=1e-7)
    np.testing.assert_allclose(x2, x1, atol=2e-3)  # batched convs sum in another order: a few 8-bit codes flip
    # group 0 ran group 1's 16-bit schedule: the same errors as its images under a static 16-bit run
    ref, _ = eng.errors_fn(bank.keys[idx[0]], bank.traj[:, idx[0]], jnp.asarray(bits[1]), jnp.asarray(bits[1]))
    np.testing.assert_allclose(e1[:, :2], np.asarray(ref), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="chunk"):
        grouped_errors(eng, bank, idx, bits, bits, chunk=0)


def test_equal_compute_charges_the_evolution_its_starting_points(tiny, all_bl):
    """Under max_evaluations every search, the evolution included (its sensitivity probes and the timestep
    schedules it starts from counted), spends at most the cap in train-bank forwards."""
    eng, bank = tiny
    per = bank.size * eng.num_steps
    evo = next(b for b in all_bl if b.name == "search_evolution").info
    prior = -(-(evo["sensitivity_forwards"] + evo["init_forwards"]) // per)
    cap = prior + 3 * 4  # room for the initial population and two generations of 4
    capped = B.all_baselines(eng, bank, BUDGET, progress=False, search_kwargs={"population": 4},
                             max_evaluations=cap)
    by = {b.name: b.info for b in capped}
    assert by["search_evolution"]["generations"] == 2
    for name in ("search_evolution", *NEW):
        assert 0 < by[name]["forwards"] <= cap * per, name
