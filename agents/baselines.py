"""Non-RL bitwidth baselines: a learned policy only matters if it beats these at equal cost.

Every builder returns a :class:`Baseline`: ``bits_w`` / ``bits_a`` int32 (S, L) schedules (S sampler
steps, L quantizable layers, registry order) plus an ``info`` dict saying how it was built.

* :func:`uniform_baselines` -- fixed uniform W/A pairs (independent of any budget).
* :func:`~qpolicy.agents.sensitivity.layer_sensitivity` +
  :func:`~qpolicy.agents.sensitivity.sensitivity_mixed_precision` -- static per-layer mixed precision from measured sensitivity under a cost budget, solved as an integer program
  (HAWQ-V3 / MixDQ style), with a greedy fallback.
* :func:`timestep_schedules` -- timestep-only schedules (PTQD style): every layer shares the step's
  bits; two-level ramps up (low bits on early, noisy steps) and down.
* :func:`~qpolicy.agents.search.search_schedule` -- per-(step, layer) evolutionary search (AdaTSQ style).
* :func:`~qpolicy.agents.search.search_beam` -- beam search lowering (layer, run-of-steps) blocks on end-to-end
  error (AdaTSQ style).
* :func:`~qpolicy.agents.search.timestep_bisection` -- per-timestep precision by bisection on the choice set and
  on an error tolerance (TMPDiff style).
* :func:`~qpolicy.agents.search.first_last_n` -- the rule runtimes ship: first/last n steps at high activation
  bits, a uniform base elsewhere (untied W/A).
* :func:`random_schedule` -- random bits repaired to the budget (:mod:`qpolicy.agents.budget`).
* :func:`all_baselines` -- all of the above.

Compute: every Baseline from :func:`all_baselines` has info "evaluations" (schedules scored on the train bank)
and "forwards" (denoiser image-forwards = evaluations * images * num_steps; sensitivity probes count for the ILP,
the shared timestep-family scoring for both ramps, 0 for uniform and random), for equal-compute comparisons.

Budgets follow :mod:`qpolicy.agents.budget`; train-bank scores and batching :mod:`qpolicy.agents.scoring`.
Selection and fitting only ever see the **train** bank passed in; evaluating on the eval bank is the caller's job.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

import numpy as np

from qpolicy.banks import ReferenceBank
from qpolicy.bits import check_bits
from qpolicy.engine import QuantEngine

from .budget import TOL, budget_repair, check_budget, cost_table, schedule_cost, to_choice_bits
from .scoring import TRAJ_TIE, Baseline, score, train_scores
from .search import first_last_n, search_beam, search_schedule, timestep_bisection
from .sensitivity import layer_sensitivity, sensitivity_mixed_precision

__all__ = [
    "Baseline", "schedule_cost", "budget_repair", "uniform_baselines", "layer_sensitivity",
    "sensitivity_mixed_precision", "timestep_schedules", "search_schedule", "search_beam", "timestep_bisection",
    "first_last_n", "random_schedule", "all_baselines", "train_scores", "TRAJ_TIE",
]


def uniform_name(w: int, a: int) -> str:
    return f"uniform_w{w}a{a}"


# ------------------------------------------------------------------------------------------ 1. uniform
def uniform_baselines(engine: QuantEngine, pairs: Iterable[tuple[int, int]] | None = None) -> list[Baseline]:
    """Uniform schedules, one per (w, a) pair (every layer and step at W{w}A{a}), named ``uniform_w{w}a{a}``.

    Default pairs (at most 20): every tied pair (b, b) for b in bit_choices, plus W8A{a} and W{w}A8 for
    a, w in {4, 5, 6, 16} that are in bit_choices (W8A8 counted once) -- 16 schedules with the default
    choices. Uniform schedules ignore any budget; ``info`` records their cost."""
    ch = engine.qcfg.bit_choices
    if pairs is None:
        pairs = [(b, b) for b in ch]
        if 8 in ch:
            extra = [b for b in (4, 5, 6, 16) if b in ch]
            pairs += [(8, a) for a in extra] + [(w, 8) for w in extra]
        pairs = pairs[:20]
    out = []
    seen = set()
    S, L = engine.num_steps, engine.num_layers
    for w, a in pairs:
        w, a = int(w), int(a)
        if (w, a) in seen:
            continue
        seen.add((w, a))
        bw = check_bits(np.full((S, L), w), ch, field="pairs (weight bits)")
        ba = check_bits(np.full((S, L), a), ch, field="pairs (activation bits)")
        out.append(Baseline(uniform_name(w, a), bw, ba, {"kind": "uniform", "w": w, "a": a,
                                                          "cost": schedule_cost(engine, bw, ba)}))
    return out


# ------------------------------------------------------------------------------------------ 4. timestep-only
def timestep_schedules(engine: QuantEngine, budget: float, bank: ReferenceBank, *, chunk: int | None = None
                       ) -> list[Baseline]:
    """PTQD-style timestep-only schedules (every layer shares each step's tied bits), best of a family.

    Family: two-level step functions, lo bits then hi bits switching at step k ("ramp_up": low bits on the
    early, noisy steps, high bits late; "ramp_down": the reverse), over every choice pair lo < hi, with the
    switch placed to give as many hi steps as the budget allows, plus the constant schedules within budget.
    Returns [timestep_ramp_up, timestep_ramp_down], each the family member of its direction with the lowest
    train-bank score (bank: a train bank). Step 0 is the first sampler step (from pure noise)."""
    t0 = time.perf_counter()
    tab = cost_table(engine)
    budget = check_budget(engine, budget, tab)
    ch = engine.qcfg.bit_choices
    C, S, L = len(ch), engine.num_steps, engine.num_layers
    step_cost = tab[:, np.arange(C), np.arange(C)].sum(0)  # (C,) cost of one step at uniform choice c
    ok = lambda prof: step_cost[prof].mean() <= budget * (1 + TOL)
    cands: dict[str, list[tuple[int, ...]]] = {"ramp_up": [], "ramp_down": []}
    for c in range(C):
        prof = (c,) * S
        if ok(np.array(prof)):
            cands["ramp_up"].append(prof)
            cands["ramp_down"].append(prof)
    for lo in range(C):
        for hi in range(lo + 1, C):
            for n_hi in range(S - 1, 0, -1):  # most hi steps that fit
                up = (lo,) * (S - n_hi) + (hi,) * n_hi
                if ok(np.array(up)):
                    cands["ramp_up"].append(up)
                    cands["ramp_down"].append(up[::-1])
                    break
    uniq = sorted({p for v in cands.values() for p in v})
    scheds = []
    for p in uniq:
        b = np.repeat(to_choice_bits(engine, np.array(p))[:, None], L, 1).astype(np.int32)
        scheds.append((b, b))
    fin, trj = train_scores(engine, bank, scheds, chunk=chunk)
    scores = dict(zip(uniq, score(fin, trj)))
    out = []
    secs = time.perf_counter() - t0
    for d in ("ramp_up", "ramp_down"):
        best = min(cands[d], key=lambda p: (scores[p], p))
        b = scheds[uniq.index(best)][0]
        prof = [int(x) for x in to_choice_bits(engine, np.array(best))]
        levels = sorted(set(prof))
        out.append(Baseline(f"timestep_{d}", b.copy(), b.copy(), {
            "kind": "timestep", "direction": d, "budget": budget, "bits_per_step": prof,
            "lo": levels[0], "hi": levels[-1], "switch_step": next((i for i in range(1, S) if prof[i] != prof[0]), None),
            "train_final_error": float(fin[uniq.index(best)]), "train_traj_error": float(trj[uniq.index(best)]),
            "family_size": len(cands[d]), "evaluated": len(uniq), "cost": schedule_cost(engine, b, b),
            "seconds": secs}))
    return out


# ------------------------------------------------------------------------------------------ 6. random
def random_schedule(engine: QuantEngine, budget: float, *, seed: int = 0, tie: bool = True,
                    priority: Any = None) -> Baseline:
    """Uniformly random bit choices per (step, layer) (tied W/A unless tie=False), then
    :func:`budget_repair` to the budget (priority: as there; None lowers the highest bits first).
    Name "random"."""
    rng = np.random.default_rng(seed)
    S, L = engine.num_steps, engine.num_layers
    ch = np.asarray(engine.qcfg.bit_choices, np.int32)
    bw = ch[rng.integers(len(ch), size=(S, L))]
    ba = bw.copy() if tie else ch[rng.integers(len(ch), size=(S, L))]
    cost0 = schedule_cost(engine, bw, ba)
    bw, ba = budget_repair(engine, bw, ba, budget, priority)
    return Baseline("random", bw.astype(np.int32), ba.astype(np.int32),
                    {"kind": "random", "seed": seed, "tie": tie, "budget": float(budget),
                     "cost_before_repair": cost0, "cost": schedule_cost(engine, bw, ba)})


# ------------------------------------------------------------------------------------------ 7. all
def all_baselines(engine: QuantEngine, train_bank: ReferenceBank, budget: float, *, search: bool = True,
                  progress: bool = True, seed: int = 0, sens_images: int | None = 16,
                  search_kwargs: dict | None = None, chunk: int | None = None,
                  max_evaluations: int | None = None, beam_kwargs: dict | None = None) -> list[Baseline]:
    """Every baseline at ``budget``: the uniform ones (fixed, budget-independent) first, then
    sensitivity_ilp, timestep_ramp_up, timestep_ramp_down, then (if ``search``) search_evolution (seeded also
    with the two timestep schedules), search_beam, timestep_bisection and first_last_n, and random.
    Sensitivity is measured once on the first ``sens_images`` train images and shared; each Baseline's info gets
    "seconds" (its build time; the ILP's includes the shared sensitivity measurement), "evaluations" and
    "forwards" (see the module docstring). max_evaluations: cap on the schedules each search scores (None:
    uncapped; search_evolution gets the generations left after the sensitivity probes and the timestep schedules
    it starts from, (max_evaluations - prior) // population - 1); beam_kwargs: extra
    search_beam arguments."""
    from tqdm.auto import tqdm

    budget = check_budget(engine, budget)
    S = engine.num_steps
    news = ["beam", "bisection", "first_last_n"]
    stages = ["uniform", "sensitivity", "ilp", "timestep"] + (["search"] + news if search else []) + ["random"]
    bar = tqdm(total=len(stages), desc="baselines", disable=not progress)
    out: list[Baseline] = []

    def stage(name):
        bar.set_postfix_str(name)

    stage("uniform")
    t = time.perf_counter()
    uni = uniform_baselines(engine)
    dt = (time.perf_counter() - t) / max(len(uni), 1)
    out += [dataclasses.replace(b, info={**b.info, "seconds": dt, "evaluations": 0, "forwards": 0}) for b in uni]
    bar.update(1)

    stage("sensitivity")
    sens, sinfo = layer_sensitivity(engine, train_bank, max_images=sens_images, chunk=chunk,
                                    progress=progress, return_info=True)
    sinfo["forwards"] = sinfo["probes"] * sinfo["images"] * S
    bar.update(1)

    stage("ilp")
    ilp = sensitivity_mixed_precision(engine, sens, budget)
    ilp.info.update(sensitivity=sinfo, seconds=ilp.info["seconds"] + sinfo["seconds"],
                    sensitivity_table=sens.tolist(), evaluations=sinfo["probes"], forwards=sinfo["forwards"])
    out.append(ilp)
    bar.update(1)

    stage("timestep")
    ts = timestep_schedules(engine, budget, train_bank, chunk=chunk)
    for b in ts:  # one shared scoring of the family serves both directions
        b.info.update(evaluations=b.info["evaluated"], forwards=b.info["evaluated"] * train_bank.size * S)
    out += ts
    bar.update(1)

    if search:
        stage("search")
        kw = {"seed": seed, "chunk": chunk, "progress": progress, **(search_kwargs or {})}
        # it starts from the shared sensitivity table and the scored timestep schedules: charge both
        prior = sinfo["forwards"] + (ts[0].info["forwards"] if ts else 0)
        if max_evaluations is not None:  # equal compute: what is left after the prior work, in whole generations
            left = max_evaluations - -(-prior // (train_bank.size * S))  # minus prior forwards, rounded up
            kw["generations"] = max(0, left // kw.get("population", 8) - 1)
        evo = search_schedule(engine, train_bank, budget, sens=sens, init=ts, **kw)
        evo.info.update(forwards=evo.info["forwards"] + prior, sensitivity_forwards=sinfo["forwards"],
                        init_forwards=prior - sinfo["forwards"])
        out.append(evo)
        bar.update(1)
        common = {"chunk": chunk, "progress": progress, "max_evaluations": max_evaluations}
        stage("beam")
        out.append(search_beam(engine, train_bank, budget, **{**common, **(beam_kwargs or {})}))
        bar.update(1)
        stage("bisection")
        out.append(timestep_bisection(engine, train_bank, budget, **common))
        bar.update(1)
        stage("first_last_n")
        out.append(first_last_n(engine, train_bank, budget, **common))
        bar.update(1)

    stage("random")
    t = time.perf_counter()
    r = random_schedule(engine, budget, seed=seed)  # neutral repair: no sensitivity knowledge
    r.info.update(seconds=time.perf_counter() - t, evaluations=0, forwards=0)
    out.append(r)
    bar.update(1)
    bar.close()
    return out
