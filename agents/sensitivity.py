"""Static per-layer mixed precision from measured sensitivity (HAWQ-V3 / MixDQ style): one-layer probes, then an
integer program (scipy.optimize.milp) or a greedy solver under the BOPs budget."""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from qpolicy.banks import ReferenceBank, subset
from qpolicy.engine import QuantEngine

from .budget import TOL, check_budget, cost_table, repair, schedule_cost, to_choice_bits
from .scoring import Baseline, train_scores


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
    bank = subset(bank, max_images)
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


def static_problem(engine: QuantEngine, sens: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated (L, C) sensitivity and the (L, C) tied per-step relative cost of each layer at each choice."""
    ch = engine.qcfg.bit_choices
    L, C = engine.num_layers, len(ch)
    sens = np.asarray(sens, np.float64)
    if sens.shape != (L, C):
        raise ValueError(f"sens must be (L, C) = {(L, C)} (layers x bit_choices {ch}), got {sens.shape}")
    if not np.all(np.isfinite(sens)):
        raise ValueError("sens must be finite")
    tab = cost_table(engine)
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
    if cost[np.arange(L), idx].sum() > budget * (1 + TOL):
        return None
    return idx


def _greedy_static(engine: QuantEngine, sens: np.ndarray, budget: float) -> np.ndarray:
    C = sens.shape[1]
    tab = cost_table(engine)
    iw = np.full((1, engine.num_layers), C - 1, np.int64)
    iw, _ = repair(tab, iw, iw, budget, sens[None], tie=True)
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
    sens, cost = static_problem(engine, sens)
    budget = check_budget(engine, budget)
    idx = _solve_milp(sens, cost, budget) if solver == "milp" else None
    used = "milp" if idx is not None else "greedy"
    if idx is None:
        idx = _greedy_static(engine, sens, budget)
    bits = np.broadcast_to(to_choice_bits(engine, idx), (engine.num_steps, engine.num_layers)).astype(np.int32).copy()
    L = engine.num_layers
    info = {"kind": "static_mixed_precision", "solver": used, "requested_solver": solver, "budget": budget,
            "objective": float(sens[np.arange(L), idx].sum()), "cost": schedule_cost(engine, bits, bits),
            "seconds": time.perf_counter() - t0}
    return Baseline("sensitivity_ilp" if used == "milp" else "sensitivity_greedy", bits, bits.copy(), info)
