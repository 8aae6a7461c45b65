"""Budgets: the cost of a schedule, the budget checks, and greedy repair/fill of (T, L) choice-index schedules.

A budget is a target ``cost_rel_fp32`` (trajectory cost over the FP32 sampler's, see
:meth:`qpolicy.cost.CostModel.summary`: BOPs, e.g. uniform W8A8 = 0.0625, W4A4 = 0.015625, or measured latency with
``env.cost: latency``). Every cost comes from the
engine's :meth:`~qpolicy.cost.CostModel.table`. ``tab``: that (L, C, C) table; ``iw`` / ``ia``: (T, L) choice
indices of weights / activations; ``prio``: (T, L, C) penalty of each entry at each choice (lower is better).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qpolicy.bits import to_bits, to_index

#: Relative slack on budget comparisons (float round-off).
TOL = 1e-9


def schedule_cost(engine: Any, bits_w: Any, bits_a: Any) -> float:
    """Trajectory cost ``cost_rel_fp32`` of a (T, L) (or (L,)) schedule, from the engine's CostModel (BOPs, or the
    measured latency table with ``env.cost: latency``)."""
    return engine.cost_model().summary(np.asarray(bits_w), np.asarray(bits_a))["cost_rel_fp32"]


def cost_table(engine: Any) -> np.ndarray:
    """(L, C, C) relative cost of one forward (:meth:`qpolicy.cost.CostModel.table`); a (T, L) schedule costs the
    mean over T of its row sums."""
    return engine.cost_model().table()


def to_choice_index(engine: Any, bits: Any, field: str) -> np.ndarray:
    """Bits -> int64 choice indices of the engine's choice set (validated, errors naming ``field``)."""
    return to_index(bits, engine.qcfg.bit_choices, field=field)


def to_choice_bits(engine: Any, idx: np.ndarray) -> np.ndarray:
    """Choice indices -> int32 bits of the engine's choice set."""
    return to_bits(idx, engine.qcfg.bit_choices)


def traj_cost(tab: np.ndarray, iw: np.ndarray, ia: np.ndarray) -> float:
    L = tab.shape[0]
    return float(tab[np.arange(L), iw, ia].sum(-1).mean())


def min_cost(engine: Any, tab: np.ndarray) -> float:
    """Every layer at its cheapest pair (the lowest bits under BOPs; a measured latency table need not be monotone
    in bits, e.g. bf16 slower than fp32 on a CPU)."""
    return float(tab.reshape(tab.shape[0], -1).min(1).sum())


def check_budget(engine: Any, budget: float, tab: np.ndarray | None = None) -> float:
    tab = cost_table(engine) if tab is None else tab
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number (target bops_rel_fp32 in (0, 1]), got {budget!r}") from None
    lo = min_cost(engine, tab)
    b0 = engine.qcfg.bit_choices[0]
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive bops_rel_fp32 (e.g. 0.0625 = uniform W8A8), got {budget}")
    if budget < lo * (1 - TOL):
        raise ValueError(f"budget={budget:.6g} is below the minimum achievable cost {lo:.6g} "
                         f"(every layer at its cheapest pair, W{b0}A{b0} under BOPs); raise the budget to at least {lo:.6g}")
    return budget


def priority_table(prio: np.ndarray | None, T: int, L: int, C: int) -> np.ndarray | None:
    """Broadcast a sensitivity-like priority (L, C) or (T, L, C) to (T, L, C)."""
    if prio is None:
        return None
    p = np.asarray(prio, np.float64)
    if p.shape == (L, C):
        p = np.broadcast_to(p, (T, L, C))
    if p.shape != (T, L, C):
        raise ValueError(f"priority must be (L, C) = {(L, C)} or (T, L, C) = {(T, L, C)} "
                         f"(penalty of each layer at each bit choice), got {np.shape(prio)}")
    return p


def _moves(tab, iw, ia, prio, tie, direction):
    """Candidate single moves (one choice index down (-1) or up (+1)) of every (t, l) entry; a lowering move skips
    choices that would not save cost (a latency table may price bf16 above fp32), so it lands on the nearest lower
    choice that is cheaper (under BOPs always the next one).

    Returns a list of (which, ok, dcost, dsens, nw, na) arrays per move kind; which: 0 = tied or W, 1 = A.
    dcost / dsens are the trajectory-cost and penalty changes (dcost < 0 when lowering); nw / na the new indices."""
    T, L = iw.shape
    C = tab.shape[1]
    lidx = np.arange(L)[None, :]
    kinds = [(True, True)] if tie else [(True, False), (False, True)]
    out = []
    for k, (mw, ma) in enumerate(kinds):
        nw = iw + direction if mw else iw
        na = ia + direction if ma else ia
        if direction < 0:  # the first lower choice that is cheaper than the current one
            here = tab[lidx, iw, ia]
            for s in range(2, C):
                stuck = (tab[lidx, np.clip(nw, 0, C - 1), np.clip(na, 0, C - 1)] >= here)
                nw = np.where(stuck & mw, iw - s, nw)
                na = np.where(stuck & ma, ia - s, na)
        ok = (nw >= 0) & (nw < C) & (na >= 0) & (na < C)
        nwc, nac = np.clip(nw, 0, C - 1), np.clip(na, 0, C - 1)
        dcost = (tab[lidx, nwc, nac] - tab[lidx, iw, ia]) / T
        if prio is None:
            dsens = np.zeros_like(dcost)
        else:
            tt, ll = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
            cur = iw if mw else ia
            new = nwc if mw else nac
            dsens = prio[tt, ll, new] - prio[tt, ll, cur]
        out.append((k, ok, dcost, dsens, nw, na))
    return out


def repair(tab, iw, ia, budget, prio=None, *, tie=True, frozen=None, cur_bits=None):
    """Greedy: while over budget, lower by one choice the (unfrozen) entry with the least penalty increase
    per unit of cost saved (ties: the larger saving). Without a priority: the highest-bit entry first
    (ties: the larger saving). Returns new index arrays (copies)."""
    if prio is None and cur_bits is None:
        cur_bits = np.arange(tab.shape[1])  # choice index orders like bits
    iw, ia = iw.copy(), ia.copy()
    if tie:
        ia = iw
    cost = traj_cost(tab, iw, ia)
    while cost > budget * (1 + TOL):
        best = None
        for k, ok, dcost, dsens, nw, na in _moves(tab, iw, ia, prio, tie, -1):
            ok = ok & (dcost < 0)
            if frozen is not None:
                ok = ok & ~frozen
            if not ok.any():
                continue
            if prio is None:
                cur = iw if k == 0 else ia
                primary = -cur_bits[cur].astype(np.float64)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    primary = dsens / -dcost
            primary = np.where(ok, primary, np.inf)
            secondary = np.where(ok, dcost, np.inf)  # more negative = larger saving
            flat = np.lexsort((secondary.ravel(), primary.ravel()))[0]
            t, l = np.unravel_index(flat, iw.shape)
            cand = (primary[t, l], secondary[t, l], k, t, l, nw[t, l], na[t, l])
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None:
            if frozen is not None:
                return repair(tab, iw, ia, budget, prio, tie=tie, frozen=None, cur_bits=cur_bits)
            raise ValueError(f"budget={budget:.6g} cannot be met: every entry is already at the minimum bits")
        _, _, k, t, l, new_w, new_a = best
        if tie or k == 0:
            iw[t, l] = new_w
        else:
            ia[t, l] = new_a
        cost = traj_cost(tab, iw, ia)
    return iw, (iw.copy() if tie else ia)


def fill(tab, iw, ia, budget, prio, *, tie=True, frozen=None):
    """Greedy: while some single raise fits in the remaining budget, raise the (unfrozen) entry with the
    largest penalty reduction per unit of cost (only raises that reduce the penalty)."""
    if prio is None:
        return iw, ia
    iw, ia = iw.copy(), ia.copy()
    if tie:
        ia = iw
    cost = traj_cost(tab, iw, ia)
    while True:
        slack = budget * (1 + TOL) - cost
        best = None
        for k, ok, dcost, dsens, _, _ in _moves(tab, iw, ia, prio, tie, +1):
            ok = ok & (dcost <= slack) & (dsens < 0)
            if frozen is not None:
                ok = ok & ~frozen
            if not ok.any():
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                gain = np.where(ok, -dsens / np.maximum(dcost, 1e-30), -np.inf)
            flat = int(np.argmax(gain))
            t, l = np.unravel_index(flat, iw.shape)
            if best is None or gain[t, l] > best[0]:
                best = (gain[t, l], k, t, l, dcost[t, l])
        if best is None:
            return iw, (iw.copy() if tie else ia)
        _, k, t, l, dc = best
        if tie or k == 0:
            iw[t, l] += 1
        else:
            ia[t, l] += 1
        cost += dc


def budget_repair(engine: Any, bits_w: Any, bits_a: Any, budget: float, priority: Any = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Lower bits until the schedule's ``cost_rel_fp32`` is <= ``budget``; returns int32 (T, L) bits_w, bits_a.

    bits_w, bits_a: (T, L) (usually T = S) or (L,). Greedy: repeatedly lower (by one choice) the entry
    with the smallest penalty increase per BOP saved. ``priority``: (L, C) or (T, L, C) penalty of each
    entry at each bit choice (C = len(bit_choices)), e.g. a :func:`layer_sensitivity` table; None lowers
    the highest-bit entries first (ties: the larger BOP saving). Tied inputs (bits_w == bits_a) stay tied;
    untied inputs lower W or A separately. A schedule already within budget is returned unchanged.
    Raises ValueError if ``budget`` is below the all-minimum-bits cost."""
    bw0, ba0 = np.asarray(bits_w), np.asarray(bits_a)
    squeeze = bw0.ndim == 1
    bw0, ba0 = np.atleast_2d(bw0), np.atleast_2d(ba0)
    if bw0.shape != ba0.shape or bw0.shape[-1] != engine.num_layers:
        raise ValueError(f"bits_w {bw0.shape} and bits_a {ba0.shape} must both be (T, L) with "
                         f"L = {engine.num_layers}")
    tab = cost_table(engine)
    budget = check_budget(engine, budget, tab)
    iw, ia = to_choice_index(engine, bw0, "bits_w"), to_choice_index(engine, ba0, "bits_a")
    tie = bool(np.array_equal(iw, ia))
    prio = priority_table(priority, *iw.shape, tab.shape[1])
    iw, ia = repair(tab, iw, ia, budget, prio, tie=tie, cur_bits=np.asarray(engine.qcfg.bit_choices))
    bw, ba = to_choice_bits(engine, iw), to_choice_bits(engine, ia)
    return (bw[0], ba[0]) if squeeze else (bw, ba)


def uniform_at_budget(engine: Any, tab: np.ndarray, budget: float) -> np.ndarray:
    """(S, L) choice indices of the highest uniform tied choice whose cost fits ``budget``."""
    C = tab.shape[1]
    step_cost = tab[:, np.arange(C), np.arange(C)].sum(0)
    c = int(np.nonzero(step_cost <= budget * (1 + TOL))[0].max())
    return np.full((engine.num_steps, engine.num_layers), c, np.int64)
