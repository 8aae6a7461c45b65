"""Non-RL bitwidth baselines: a learned policy only matters if it beats these at equal cost.

Every builder returns a :class:`Baseline`: ``bits_w`` / ``bits_a`` int32 (S, L) schedules (S sampler
steps, L quantizable layers, registry order) plus an ``info`` dict saying how it was built.

* :func:`uniform_baselines` -- fixed uniform W/A pairs (independent of any budget).
* :func:`layer_sensitivity` + :func:`sensitivity_mixed_precision` -- static per-layer mixed precision
  from measured sensitivity under a cost budget, solved as an integer program (HAWQ-V3 / MixDQ style),
  with a greedy fallback.
* :func:`timestep_schedules` -- timestep-only schedules (PTQD style): every layer shares the step's
  bits; two-level ramps up (low bits on early, noisy steps) and down.
* :func:`search_schedule` -- per-(step, layer) evolutionary search (AdaTSQ style).
* :func:`random_schedule` -- random bits repaired to the budget.
* :func:`all_baselines` -- all of the above.

Budget convention: a budget is a target ``bops_rel_fp32`` (trajectory BOPs over the FP32 sampler's,
see :meth:`qpolicy.cost.CostModel.summary`), e.g. uniform W8A8 = 0.0625, W4A4 = 0.015625. Every cost
here comes from the engine's :class:`~qpolicy.cost.CostModel` (BOPs; a latency table, if any, is not
used for budgets). Selection and fitting only ever see the **train** bank passed in (errors from
``engine.errors_fn``); evaluating on the eval bank is the caller's job.

Train-bank *score* of a schedule = mean final-sample error + ``TRAJ_TIE`` * mean trajectory error
(the small trajectory term only breaks ties).

Batching: on CPU, ``jax.vmap`` over schedules turns every conv into a per-schedule grouped conv and is
several times *slower* per schedule than a loop over the already-jitted ``engine.errors_fn`` (measured
on digits16: 0.7 s vs 0.15 s per 16-image run), so ``chunk=None`` means a loop on CPU and vmapped
chunks of 16 schedules on accelerators. Pass ``chunk`` explicitly to override.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.rollout import QuantEngine, ReferenceBank, check_bits

__all__ = [
    "Baseline", "schedule_cost", "budget_repair", "uniform_baselines", "layer_sensitivity",
    "sensitivity_mixed_precision", "timestep_schedules", "search_schedule", "random_schedule",
    "all_baselines", "train_scores", "TRAJ_TIE",
]

#: Weight of the mean trajectory error in the train-bank score (a tie-break next to the final error).
TRAJ_TIE = 1e-3
_TOL = 1e-9  # relative slack on budget comparisons (float round-off)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One baseline schedule. bits_w / bits_a: int32 (S, L); info: how it was built (budget, stats)."""

    name: str
    bits_w: np.ndarray
    bits_a: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return bool(np.array_equal(self.bits_w, self.bits_a))


# ------------------------------------------------------------------------------------------ cost helpers
def schedule_cost(engine: QuantEngine, bits_w: Any, bits_a: Any) -> float:
    """Trajectory cost ``bops_rel_fp32`` of a (T, L) (or (L,)) schedule, from the engine's CostModel."""
    return engine.cost_model().summary(np.asarray(bits_w), np.asarray(bits_a))["bops_rel_fp32"]


def _cost_table(engine: QuantEngine) -> np.ndarray:
    """(L, C, C) relative cost of one forward of layer l at (choice i for W, choice j for A), i.e.
    BOPs_l / BOPs_FP32 of the whole model; a (T, L) schedule costs the mean over T of its row sums."""
    cm = engine.cost_model()
    ch = np.asarray(engine.qcfg.bit_choices, np.float64)
    L = engine.num_layers
    eye = np.eye(L)
    # cm.bops sums MACs * b_w * b_a over the last axis; one-hot rows isolate each layer.
    bw = ch[:, None, None, None] * eye[None, None]            # (C, 1, L, L)
    ba = ch[None, :, None, None] * eye[None, None]            # (1, C, L, L)
    per = cm.bops(np.broadcast_to(bw, (len(ch), len(ch), L, L)), np.broadcast_to(ba, (len(ch), len(ch), L, L)))
    return np.transpose(per, (2, 0, 1)) / cm.bops_fp32        # (L, C, C)


def _idx(engine: QuantEngine, bits: Any, field: str) -> np.ndarray:
    ch = engine.qcfg.bit_choices
    b = check_bits(bits, ch, field=field)
    return np.searchsorted(np.asarray(ch), b).astype(np.int64)


def _bits(engine: QuantEngine, idx: np.ndarray) -> np.ndarray:
    return np.asarray(engine.qcfg.bit_choices, np.int32)[idx]


def _traj_cost(tab: np.ndarray, iw: np.ndarray, ia: np.ndarray) -> float:
    L = tab.shape[0]
    return float(tab[np.arange(L), iw, ia].sum(-1).mean())


def _min_cost(engine: QuantEngine, tab: np.ndarray) -> float:
    return float(tab[:, 0, 0].sum())


def _check_budget(engine: QuantEngine, budget: float, tab: np.ndarray | None = None) -> float:
    tab = _cost_table(engine) if tab is None else tab
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number (target bops_rel_fp32 in (0, 1]), got {budget!r}") from None
    lo = _min_cost(engine, tab)
    b0 = engine.qcfg.bit_choices[0]
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive bops_rel_fp32 (e.g. 0.0625 = uniform W8A8), got {budget}")
    if budget < lo * (1 - _TOL):
        raise ValueError(f"budget={budget:.6g} is below the minimum achievable cost {lo:.6g} "
                         f"(every layer at W{b0}A{b0}); raise the budget to at least {lo:.6g}")
    return budget


def _prio_table(prio: np.ndarray | None, T: int, L: int, C: int) -> np.ndarray | None:
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
    """Candidate single moves (one choice index down (-1) or up (+1)) of every (t, l) entry.

    Returns a list of (which, t, l, dcost, dsens) arrays per move kind; which: 0 = tied or W, 1 = A.
    dcost / dsens are the trajectory-cost and penalty changes (dcost < 0 when lowering)."""
    T, L = iw.shape
    C = tab.shape[1]
    lidx = np.arange(L)[None, :]
    kinds = [(True, True)] if tie else [(True, False), (False, True)]
    out = []
    for k, (mw, ma) in enumerate(kinds):
        nw = iw + direction if mw else iw
        na = ia + direction if ma else ia
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
        out.append((k, ok, dcost, dsens))
    return out


def _repair(tab, iw, ia, budget, prio=None, *, tie=True, frozen=None, cur_bits=None):
    """Greedy: while over budget, lower by one choice the (unfrozen) entry with the least penalty increase
    per unit of cost saved (ties: the larger saving). Without a priority: the highest-bit entry first
    (ties: the larger saving). Returns new index arrays (copies)."""
    if prio is None and cur_bits is None:
        cur_bits = np.arange(tab.shape[1])  # choice index orders like bits
    iw, ia = iw.copy(), ia.copy()
    if tie:
        ia = iw
    cost = _traj_cost(tab, iw, ia)
    while cost > budget * (1 + _TOL):
        best = None
        for k, ok, dcost, dsens in _moves(tab, iw, ia, prio, tie, -1):
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
            cand = (primary[t, l], secondary[t, l], k, t, l)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None:
            if frozen is not None:
                return _repair(tab, iw, ia, budget, prio, tie=tie, frozen=None, cur_bits=cur_bits)
            raise ValueError(f"budget={budget:.6g} cannot be met: every entry is already at the minimum bits")
        _, _, k, t, l = best
        if tie:
            iw[t, l] -= 1
        elif k == 0:
            iw[t, l] -= 1
        else:
            ia[t, l] -= 1
        cost = _traj_cost(tab, iw, ia)
    return iw, (iw.copy() if tie else ia)


def _fill(tab, iw, ia, budget, prio, *, tie=True, frozen=None):
    """Greedy: while some single raise fits in the remaining budget, raise the (unfrozen) entry with the
    largest penalty reduction per unit of cost (only raises that reduce the penalty)."""
    if prio is None:
        return iw, ia
    iw, ia = iw.copy(), ia.copy()
    if tie:
        ia = iw
    cost = _traj_cost(tab, iw, ia)
    while True:
        slack = budget * (1 + _TOL) - cost
        best = None
        for k, ok, dcost, dsens in _moves(tab, iw, ia, prio, tie, +1):
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


def budget_repair(engine: QuantEngine, bits_w: Any, bits_a: Any, budget: float, priority: Any = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Lower bits until the schedule's ``bops_rel_fp32`` is <= ``budget``; returns int32 (T, L) bits_w, bits_a.

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
    tab = _cost_table(engine)
    budget = _check_budget(engine, budget, tab)
    iw, ia = _idx(engine, bw0, "bits_w"), _idx(engine, ba0, "bits_a")
    tie = bool(np.array_equal(iw, ia))
    prio = _prio_table(priority, *iw.shape, tab.shape[1])
    iw, ia = _repair(tab, iw, ia, budget, prio, tie=tie, cur_bits=np.asarray(engine.qcfg.bit_choices))
    bw, ba = _bits(engine, iw), _bits(engine, ia)
    return (bw[0], ba[0]) if squeeze else (bw, ba)


# ------------------------------------------------------------------------------------------ evaluation
def _subset(bank: ReferenceBank, n: int | None) -> ReferenceBank:
    if n is None or n >= bank.size:
        return bank
    return ReferenceBank(name=f"{bank.name}[:{n}]", keys=bank.keys[:n], traj=bank.traj[:, :n])


def _auto_chunk(chunk: int | None) -> int:
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1 (schedules per vmapped call) or None (auto), got {chunk}")
        return int(chunk)
    return 1 if jax.default_backend() == "cpu" else 16


@functools.lru_cache(maxsize=16)
def _vmapped(engine: QuantEngine):
    def f(keys, ref, bw, ba):
        e, _ = jax.vmap(engine.errors_fn, in_axes=(None, None, 0, 0))(keys, ref, bw, ba)
        return e[:, -1].mean(-1), e.mean((1, 2))
    return jax.jit(f)


def train_scores(engine: QuantEngine, bank: ReferenceBank, schedules: Sequence[tuple[Any, Any]], *,
                 chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Final-sample and trajectory errors (means over the bank's images) of each (bits_w, bits_a) (S, L)
    schedule: two float64 arrays (N,). chunk: schedules per vmapped call (None: 1 on CPU, 16 otherwise)."""
    chunk = _auto_chunk(chunk)
    n = len(schedules)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    S, L = engine.num_steps, engine.num_layers
    bw = np.stack([np.asarray(s[0], np.int32).reshape(S, L) for s in schedules])
    ba = np.stack([np.asarray(s[1], np.int32).reshape(S, L) for s in schedules])
    fin, trj = np.empty(n), np.empty(n)
    if chunk == 1:
        for i in range(n):
            e, _ = engine.errors_fn(bank.keys, bank.traj, jnp.asarray(bw[i]), jnp.asarray(ba[i]))
            e = np.asarray(e)
            fin[i], trj[i] = e[-1].mean(), e.mean()
        return fin, trj
    fn = _vmapped(engine)
    for s in range(0, n, chunk):
        w, a = bw[s:s + chunk], ba[s:s + chunk]
        m = len(w)
        if m < chunk:  # pad to one compiled shape
            w = np.concatenate([w, np.repeat(w[-1:], chunk - m, 0)])
            a = np.concatenate([a, np.repeat(a[-1:], chunk - m, 0)])
        f, t = fn(bank.keys, bank.traj, jnp.asarray(w), jnp.asarray(a))
        fin[s:s + m], trj[s:s + m] = np.asarray(f)[:m], np.asarray(t)[:m]
    return fin, trj


def _score(fin, trj):
    return np.asarray(fin) + TRAJ_TIE * np.asarray(trj)


def _uniform_name(w: int, a: int) -> str:
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
        out.append(Baseline(_uniform_name(w, a), bw, ba, {"kind": "uniform", "w": w, "a": a,
                                                          "cost": schedule_cost(engine, bw, ba)}))
    return out


# ------------------------------------------------------------------------------------------ 2. sensitivity
def layer_sensitivity(engine: QuantEngine, bank: ReferenceBank, *, base_bits: int = 8,
                      probe_bits: Sequence[int] | None = None, max_images: int | None = 16,
                      monotone: bool = True, chunk: int | None = None, progress: bool = False,
                      return_info: bool = False) -> np.ndarray | tuple[np.ndarray, dict]:
    """Measured per-layer sensitivity (HAWQ / MixDQ style): float64 (L, C), C = len(bit_choices).

    sens[l, c] = E(layer l at choice c, all other layers at ``base_bits``, every step, tied W/A)
    - E(all layers at base_bits), E = mean final-sample error over the first ``max_images`` images of
    ``bank`` (use a train bank), clipped to >= 0 below ``base_bits`` and to <= 0 above it (fewer bits never
    help, more never hurt: what crosses zero is noise). Above the base the value is the *gain* of giving
    layer l more bits, which matters when the base itself is lossy (patches32 at W8A8). One probe per
    (layer, probed choice): L * len(probe_bits) sampler runs.

    probe_bits: choices to measure; default every choice except ``base_bits``. Unprobed choices are
    interpolated linearly in bits between probed neighbours (held constant beyond the probed range).
    monotone: make sens non-increasing in bits (running max from the high end).
    return_info: also return {"seconds", "probes", "base_error", "images"}."""
    t0 = time.perf_counter()
    ch = tuple(engine.qcfg.bit_choices)
    if base_bits not in ch:
        raise ValueError(f"base_bits must be one of bit_choices {ch}, got {base_bits}")
    if probe_bits is None:
        probe = [b for b in ch if b != base_bits]
    else:
        probe = sorted({int(b) for b in probe_bits})
        bad = [b for b in probe if b not in ch]
        if bad:
            raise ValueError(f"probe_bits {bad} are not in bit_choices {ch}")
        probe = [b for b in probe if b != base_bits]
    bank = _subset(bank, max_images)
    S, L, C = engine.num_steps, engine.num_layers, len(ch)
    base = np.full((S, L), base_bits, np.int32)
    scheds = [(base, base)]
    for l in range(L):
        for b in probe:
            s = base.copy()
            s[:, l] = b
            scheds.append((s, s))
    it = scheds
    fin = np.empty(len(scheds))
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(scheds), desc="sensitivity probes", leave=False)
    step = 64
    for s in range(0, len(it), step):
        f, _ = train_scores(engine, bank, it[s:s + step], chunk=chunk)
        fin[s:s + step] = f
        if progress:
            bar.update(len(f))
    if progress:
        bar.close()
    e0 = fin[0]
    delta = fin[1:].reshape(L, len(probe)) - e0
    above = np.array([b > base_bits for b in probe])
    meas = np.where(above, np.minimum(delta, 0.0), np.maximum(delta, 0.0))
    sens = np.zeros((L, C))
    for l in range(L):
        vals = {b: meas[l, j] for j, b in enumerate(probe)}
        vals[base_bits] = 0.0
        xs = np.array(sorted(vals))
        ys = np.array([vals[b] for b in xs])
        for c, b in enumerate(ch):  # np.interp holds the end values beyond the probed range
            sens[l, c] = vals[b] if b in vals else np.interp(b, xs, ys)
    if monotone:
        sens = np.maximum.accumulate(sens[:, ::-1], axis=1)[:, ::-1].copy()
    info = {"seconds": time.perf_counter() - t0, "probes": len(scheds), "base_error": float(e0),
            "images": bank.size, "base_bits": base_bits, "probe_bits": probe}
    return (sens, info) if return_info else sens


# ------------------------------------------------------------------------------------------ 3. static ILP
def _static_problem(engine: QuantEngine, sens: Any):
    ch = engine.qcfg.bit_choices
    L, C = engine.num_layers, len(ch)
    sens = np.asarray(sens, np.float64)
    if sens.shape != (L, C):
        raise ValueError(f"sens must be (L, C) = {(L, C)} (layers x bit_choices {ch}), got {sens.shape}")
    if not np.all(np.isfinite(sens)):
        raise ValueError("sens must be finite")
    tab = _cost_table(engine)
    cost = tab[:, np.arange(C), np.arange(C)]  # (L, C) tied per-step relative cost
    return sens, cost


def _solve_milp(sens: np.ndarray, cost: np.ndarray, budget: float) -> np.ndarray | None:
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except Exception:  # pragma: no cover - scipy too old
        return None
    L, C = sens.shape
    A_one = np.kron(np.eye(L), np.ones((1, C)))  # sum_c x[l, c] = 1
    A = np.vstack([A_one, cost.reshape(1, -1)])
    lb = np.concatenate([np.ones(L), [-np.inf]])
    ub = np.concatenate([np.ones(L), [budget]])
    try:
        res = milp(c=sens.ravel(), constraints=LinearConstraint(A, lb, ub), integrality=np.ones(L * C),
                   bounds=Bounds(0, 1), options={"time_limit": 60.0})
    except Exception:
        return None
    if res.x is None or res.status not in (0,):
        return None
    x = np.round(res.x).reshape(L, C)
    if not np.allclose(x.sum(1), 1):
        return None
    idx = x.argmax(1)
    if cost[np.arange(L), idx].sum() > budget * (1 + _TOL):
        return None
    return idx


def _greedy_static(engine: QuantEngine, sens: np.ndarray, budget: float) -> np.ndarray:
    C = sens.shape[1]
    tab = _cost_table(engine)
    iw = np.full((1, engine.num_layers), C - 1, np.int64)
    iw, _ = _repair(tab, iw, iw, budget, sens[None], tie=True)
    return iw[0]


def sensitivity_mixed_precision(engine: QuantEngine, sens: Any, budget: float, *, solver: str = "milp"
                                ) -> Baseline:
    """Static per-layer bits (same at every step, tied W/A) minimising sum_l sens[l, c_l] subject to
    trajectory ``bops_rel_fp32`` <= budget (HAWQ-V3 style integer program).

    sens: (L, C) penalty table (e.g. :func:`layer_sensitivity`). solver: "milp" (scipy.optimize.milp over
    one-hot x[l, c]; falls back to greedy if unavailable or it fails) or "greedy" (start at the highest
    bits, repeatedly lower the layer with the least sensitivity increase per BOP saved).
    Name "sensitivity_ilp" (or "sensitivity_greedy"); info: solver used, objective, cost, budget."""
    if solver not in ("milp", "greedy"):
        raise ValueError(f"solver must be 'milp' or 'greedy', got {solver!r}")
    t0 = time.perf_counter()
    sens, cost = _static_problem(engine, sens)
    budget = _check_budget(engine, budget)
    idx = _solve_milp(sens, cost, budget) if solver == "milp" else None
    used = "milp" if idx is not None else "greedy"
    if idx is None:
        idx = _greedy_static(engine, sens, budget)
    bits = np.broadcast_to(_bits(engine, idx), (engine.num_steps, engine.num_layers)).astype(np.int32).copy()
    L = engine.num_layers
    info = {"kind": "static_mixed_precision", "solver": used, "requested_solver": solver, "budget": budget,
            "objective": float(sens[np.arange(L), idx].sum()), "cost": schedule_cost(engine, bits, bits),
            "seconds": time.perf_counter() - t0}
    return Baseline("sensitivity_ilp" if used == "milp" else "sensitivity_greedy", bits, bits.copy(), info)


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
    tab = _cost_table(engine)
    budget = _check_budget(engine, budget, tab)
    ch = engine.qcfg.bit_choices
    C, S, L = len(ch), engine.num_steps, engine.num_layers
    step_cost = tab[:, np.arange(C), np.arange(C)].sum(0)  # (C,) cost of one step at uniform choice c
    ok = lambda prof: step_cost[prof].mean() <= budget * (1 + _TOL)
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
        b = np.repeat(_bits(engine, np.array(p))[:, None], L, 1).astype(np.int32)
        scheds.append((b, b))
    fin, trj = train_scores(engine, bank, scheds, chunk=chunk)
    score = dict(zip(uniq, _score(fin, trj)))
    out = []
    secs = time.perf_counter() - t0
    for d in ("ramp_up", "ramp_down"):
        best = min(cands[d], key=lambda p: (score[p], p))
        b = scheds[uniq.index(best)][0]
        prof = [int(x) for x in _bits(engine, np.array(best))]
        levels = sorted(set(prof))
        out.append(Baseline(f"timestep_{d}", b.copy(), b.copy(), {
            "kind": "timestep", "direction": d, "budget": budget, "bits_per_step": prof,
            "lo": levels[0], "hi": levels[-1], "switch_step": next((i for i in range(1, S) if prof[i] != prof[0]), None),
            "train_final_error": float(fin[uniq.index(best)]), "train_traj_error": float(trj[uniq.index(best)]),
            "family_size": len(cands[d]), "evaluated": len(uniq), "cost": schedule_cost(engine, b, b),
            "seconds": secs}))
    return out


# ------------------------------------------------------------------------------------------ 5. search
def _uniform_at_budget(engine: QuantEngine, tab: np.ndarray, budget: float) -> np.ndarray:
    C = tab.shape[1]
    step_cost = tab[:, np.arange(C), np.arange(C)].sum(0)
    c = int(np.nonzero(step_cost <= budget * (1 + _TOL))[0].max())
    return np.full((engine.num_steps, engine.num_layers), c, np.int64)


def search_schedule(engine: QuantEngine, bank: ReferenceBank, budget: float, *, method: str = "evolution",
                    generations: int = 12, population: int = 8, seed: int = 0, sens: Any = None,
                    init: Sequence[Any] = (), max_mutations: int = 4, crossover: float = 0.3,
                    max_images: int | None = None, chunk: int | None = None, progress: bool = False) -> Baseline:
    """Per-(step, layer) tied-bit search under the budget (AdaTSQ style). Name "search_evolution".

    method "evolution": a (mu + lambda) evolution. The initial population holds the sensitivity-ILP
    solution broadcast over steps, the uniform schedule at budget, any ``init`` schedules (Baselines or
    (bits_w, bits_a) pairs, repaired to the budget), and mutants of these up to ``population``. Each
    generation makes ``population`` children: tournament parent (optionally step-wise crossover with a second
    parent, probability ``crossover``), then 1..``max_mutations`` moves of +-1 choice index on a single
    (step, layer) entry or on one layer over a run of steps; children are repaired to the budget (lowering the
    unmutated entries with the least sensitivity per BOP) and filled (slack spent on the best sensitivity
    reductions per BOP). Survivors: the best ``population`` by train-bank score (final error + TRAJ_TIE *
    trajectory error), so the result is never worse than the initial population's best.
    Cost: population * (generations + 1) schedule evaluations on ``bank`` (optionally its first ``max_images``).
    sens: (L, C) sensitivity (default: measured with :func:`layer_sensitivity` on ``bank``).
    info: init_best_score, best_score, train_final_error, evaluations, history (best score per generation)."""
    if method != "evolution":
        raise ValueError(f"method must be 'evolution', got {method!r}")
    if generations < 0 or population < 1 or max_mutations < 1:
        raise ValueError(f"need generations >= 0, population >= 1, max_mutations >= 1; got {generations}, "
                         f"{population}, {max_mutations}")
    t0 = time.perf_counter()
    tab = _cost_table(engine)
    budget = _check_budget(engine, budget, tab)
    bank = _subset(bank, max_images)
    S, L, C = engine.num_steps, engine.num_layers, tab.shape[1]
    if sens is None:
        sens = layer_sensitivity(engine, bank, chunk=chunk)
    sens, _ = _static_problem(engine, sens)
    prio = _prio_table(sens, S, L, C)
    rng = np.random.default_rng(seed)

    def fix(iw, frozen=None):
        iw, _ = _repair(tab, iw, iw, budget, prio, tie=True, frozen=frozen)
        iw, _ = _fill(tab, iw, iw, budget, prio, tie=True, frozen=frozen)
        return iw

    seeds = []
    ilp = sensitivity_mixed_precision(engine, sens, budget)
    seeds.append(("sensitivity_ilp", _idx(engine, ilp.bits_w, "bits_w")))
    seeds.append(("uniform_at_budget", _uniform_at_budget(engine, tab, budget)))
    for j, s in enumerate(init):
        bw = s.bits_w if isinstance(s, Baseline) else s[0]
        name = s.name if isinstance(s, Baseline) else f"init_{j}"
        iw = _idx(engine, np.asarray(bw).reshape(S, L), "init bits_w")
        seeds.append((name, _repair(tab, iw, iw, budget, prio, tie=True)[0]))

    def mutate(iw):
        iw = iw.copy()
        frozen = np.zeros_like(iw, bool)
        for _ in range(int(rng.integers(1, max_mutations + 1))):
            l = int(rng.integers(L))
            d = int(rng.choice([-1, 1]))
            if rng.random() < 0.5:
                ts = [int(rng.integers(S))]
            else:
                a = int(rng.integers(S))
                b = int(rng.integers(a, S))
                ts = list(range(a, b + 1))
            for t in ts:
                iw[t, l] = np.clip(iw[t, l] + d, 0, C - 1)
                frozen[t, l] = True
        return fix(iw, frozen)

    seen: set[bytes] = set()
    pop_idx: list[np.ndarray] = []
    origin: list[str] = []
    for name, iw in seeds:
        if iw.tobytes() not in seen:
            seen.add(iw.tobytes())
            pop_idx.append(iw)
            origin.append(name)
    n_seeds = len(pop_idx)
    tries = 0
    while len(pop_idx) < population and tries < 50 * population:
        tries += 1
        child = mutate(pop_idx[int(rng.integers(n_seeds))])
        if child.tobytes() not in seen:
            seen.add(child.tobytes())
            pop_idx.append(child)
            origin.append("mutant")

    def evaluate(idxs):
        bs = [(_bits(engine, i), _bits(engine, i)) for i in idxs]
        return train_scores(engine, bank, bs, chunk=chunk)

    fin, trj = evaluate(pop_idx)
    scores = _score(fin, trj)
    init_best = float(scores.min())
    seed_scores = {origin[i]: float(scores[i]) for i in range(n_seeds)}
    evals = len(pop_idx)
    history = [init_best]
    order = np.argsort(scores, kind="stable")[:population]
    pop_idx = [pop_idx[i] for i in order]
    fin, trj, scores = fin[order], trj[order], scores[order]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=generations, desc="evolution", leave=False)
    for g in range(generations):
        children = []
        tries = 0
        while len(children) < population and tries < 50 * population:
            tries += 1
            k = len(pop_idx)
            i, j = rng.integers(k, size=2)
            p = pop_idx[i] if scores[i] <= scores[j] else pop_idx[j]
            if k > 1 and rng.random() < crossover:
                q = pop_idx[int(rng.integers(k))]
                mask = rng.random(S) < 0.5
                p = fix(np.where(mask[:, None], p, q))
            child = mutate(p)
            if child.tobytes() not in seen:
                seen.add(child.tobytes())
                children.append(child)
        if not children:
            break
        cf, ct = evaluate(children)
        evals += len(children)
        all_idx = pop_idx + children
        all_f, all_t = np.concatenate([fin, cf]), np.concatenate([trj, ct])
        all_s = _score(all_f, all_t)
        order = np.argsort(all_s, kind="stable")[:population]
        pop_idx = [all_idx[i] for i in order]
        fin, trj, scores = all_f[order], all_t[order], all_s[order]
        history.append(float(scores[0]))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{scores[0]:.4g}")
    if bar is not None:
        bar.close()
    best = _bits(engine, pop_idx[0]).astype(np.int32)
    info = {"kind": "search", "method": method, "budget": budget, "generations": generations,
            "population": population, "seed": seed, "evaluations": evals, "images": bank.size,
            "init_best_score": init_best, "init_scores": seed_scores, "best_score": float(scores[0]),
            "train_final_error": float(fin[0]), "train_traj_error": float(trj[0]), "history": history,
            "cost": schedule_cost(engine, best, best), "seconds": time.perf_counter() - t0}
    return Baseline(f"search_{method}", best, best.copy(), info)


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
                  search_kwargs: dict | None = None, chunk: int | None = None) -> list[Baseline]:
    """Every baseline at ``budget``: the uniform ones (fixed, budget-independent) first, then
    sensitivity_ilp, timestep_ramp_up, timestep_ramp_down, search_evolution (if ``search``; seeded also
    with the two timestep schedules) and random. Sensitivity is measured once on the first
    ``sens_images`` train images and shared; each Baseline's info gets "seconds" (its build time;
    the ILP's includes the shared sensitivity measurement)."""
    from tqdm.auto import tqdm

    budget = _check_budget(engine, budget)
    stages = ["uniform", "sensitivity", "ilp", "timestep"] + (["search"] if search else []) + ["random"]
    bar = tqdm(total=len(stages), desc="baselines", disable=not progress)
    out: list[Baseline] = []

    def stage(name):
        bar.set_postfix_str(name)

    stage("uniform")
    t = time.perf_counter()
    uni = uniform_baselines(engine)
    dt = (time.perf_counter() - t) / max(len(uni), 1)
    out += [dataclasses.replace(b, info={**b.info, "seconds": dt}) for b in uni]
    bar.update(1)

    stage("sensitivity")
    sens, sinfo = layer_sensitivity(engine, train_bank, max_images=sens_images, chunk=chunk,
                                    progress=progress, return_info=True)
    bar.update(1)

    stage("ilp")
    ilp = sensitivity_mixed_precision(engine, sens, budget)
    ilp.info.update(sensitivity=sinfo, seconds=ilp.info["seconds"] + sinfo["seconds"],
                    sensitivity_table=sens.tolist())
    out.append(ilp)
    bar.update(1)

    stage("timestep")
    ts = timestep_schedules(engine, budget, train_bank, chunk=chunk)
    out += ts
    bar.update(1)

    if search:
        stage("search")
        kw = {"seed": seed, "chunk": chunk, "progress": progress, **(search_kwargs or {})}
        out.append(search_schedule(engine, train_bank, budget, sens=sens, init=ts, **kw))
        bar.update(1)

    stage("random")
    t = time.perf_counter()
    r = random_schedule(engine, budget, seed=seed)  # neutral repair: no sensitivity knowledge
    r.info["seconds"] = time.perf_counter() - t
    out.append(r)
    bar.update(1)
    bar.close()
    return out
