"""Schedule searches under a BOPs budget, all scored end to end on a train bank.

* :func:`search_schedule` -- per-(step, layer) (mu + lambda) evolution (AdaTSQ style) seeded with the sensitivity
  ILP, the uniform schedule at budget and any given schedules. Name "search_evolution".
* :func:`search_beam` -- beam search lowering (layer, run-of-steps) blocks from just above the uniform schedule
  at budget (AdaTSQ style). Name "search_beam".
* :func:`timestep_bisection` -- per-timestep precision by bisection (TMPDiff style): every layer shares a step's
  bits. Name "timestep_bisection".
* :func:`first_last_n` -- the rule runtimes ship (diffusers-style ``first_last_n`` step policy): the first and
  last n steps at high activation bits, a uniform base elsewhere. Name "first_last_n".

Compute accounting (for equal-compute comparisons): every builder's ``info`` has "evaluations" (distinct
schedules scored) and "forwards" (denoiser image-forwards spent = evaluations * images * num_steps). The three
newer builders take ``max_evaluations`` (a hard cap on the schedules they score) and ``scorer``: a callable
mapping a list of (bits_w, bits_a) (S, L) schedules to (final_errors, traj_errors) arrays, default
:func:`~qpolicy.agents.scoring.train_scores` on (engine, bank) -- tests inject known additive errors through it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from qpolicy.banks import ReferenceBank, subset
from qpolicy.engine import QuantEngine

from .budget import (TOL, check_budget, cost_table, fill, priority_table, repair, schedule_cost, to_choice_bits,
                     to_choice_index, traj_cost, uniform_at_budget)
from .scoring import Baseline, score, train_scores
from .sensitivity import layer_sensitivity, sensitivity_mixed_precision, static_problem


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
    info: init_best_score, best_score, train_final_error, evaluations, forwards (evaluations * images * S; a
    sensitivity measured here is not counted), history (best score per generation)."""
    if method != "evolution":
        raise ValueError(f"method must be 'evolution', got {method!r}")
    if generations < 0 or population < 1 or max_mutations < 1:
        raise ValueError(f"need generations >= 0, population >= 1, max_mutations >= 1; got {generations}, "
                         f"{population}, {max_mutations}")
    t0 = time.perf_counter()
    tab = cost_table(engine)
    budget = check_budget(engine, budget, tab)
    bank = subset(bank, max_images)
    S, L, C = engine.num_steps, engine.num_layers, tab.shape[1]
    if sens is None:
        sens = layer_sensitivity(engine, bank, chunk=chunk)
    sens, _ = static_problem(engine, sens)
    prio = priority_table(sens, S, L, C)
    rng = np.random.default_rng(seed)

    def fix(iw, frozen=None):
        iw, _ = repair(tab, iw, iw, budget, prio, tie=True, frozen=frozen)
        iw, _ = fill(tab, iw, iw, budget, prio, tie=True, frozen=frozen)
        return iw

    seeds = []
    ilp = sensitivity_mixed_precision(engine, sens, budget)
    seeds.append(("sensitivity_ilp", to_choice_index(engine, ilp.bits_w, "bits_w")))
    seeds.append(("uniform_at_budget", uniform_at_budget(engine, tab, budget)))
    for j, s in enumerate(init):
        bw = s.bits_w if isinstance(s, Baseline) else s[0]
        name = s.name if isinstance(s, Baseline) else f"init_{j}"
        iw = to_choice_index(engine, np.asarray(bw).reshape(S, L), "init bits_w")
        seeds.append((name, repair(tab, iw, iw, budget, prio, tie=True)[0]))

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
        bs = [(to_choice_bits(engine, i), to_choice_bits(engine, i)) for i in idxs]
        return train_scores(engine, bank, bs, chunk=chunk)

    fin, trj = evaluate(pop_idx)
    scores = score(fin, trj)
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
        all_s = score(all_f, all_t)
        order = np.argsort(all_s, kind="stable")[:population]
        pop_idx = [all_idx[i] for i in order]
        fin, trj, scores = all_f[order], all_t[order], all_s[order]
        history.append(float(scores[0]))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{scores[0]:.4g}")
    if bar is not None:
        bar.close()
    best = to_choice_bits(engine, pop_idx[0]).astype(np.int32)
    info = {"kind": "search", "method": method, "budget": budget, "generations": generations,
            "population": population, "seed": seed, "evaluations": evals, "images": bank.size,
            "init_best_score": init_best, "init_scores": seed_scores, "best_score": float(scores[0]),
            "train_final_error": float(fin[0]), "train_traj_error": float(trj[0]), "history": history,
            "forwards": evals * bank.size * S,
            "cost": schedule_cost(engine, best, best), "seconds": time.perf_counter() - t0}
    return Baseline(f"search_{method}", best, best.copy(), info)


# ------------------------------------------------------------------------------------------ shared
#: A scorer maps a list of (bits_w, bits_a) (S, L) schedules to (final_errors, traj_errors) float arrays.
Scorer = Callable[[Sequence[tuple[Any, Any]]], tuple[np.ndarray, np.ndarray]]


class _Evaluator:
    """End-to-end scoring of choice-index schedules: cached (a schedule is scored once), counted
    (``evaluations`` = distinct schedules scored) and capped (``max_evaluations``; schedules past the cap come back
    as NaN and set ``exhausted``)."""

    def __init__(self, engine: Any, bank: Any, scorer: Scorer | None, chunk: int | None,
                 max_evaluations: int | None):
        if max_evaluations is not None and (isinstance(max_evaluations, bool) or int(max_evaluations) < 0
                                            or int(max_evaluations) != max_evaluations):
            raise ValueError(f"max_evaluations must be a non-negative integer or None, got {max_evaluations!r}")
        self.engine = engine
        self.fn = scorer if scorer is not None else (lambda sc: train_scores(engine, bank, sc, chunk=chunk))
        self.cap = None if max_evaluations is None else int(max_evaluations)
        self.cache: dict[bytes, tuple[float, float]] = {}
        self.evaluations = 0
        self.exhausted = False
        self._held = 0

    @staticmethod
    def key(iw: np.ndarray, ia: np.ndarray) -> bytes:
        return np.asarray(iw, np.int64).tobytes() + b"|" + np.asarray(ia, np.int64).tobytes()

    def left(self) -> float:
        return math.inf if self.cap is None else self.cap - self.evaluations

    def __call__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Scores (final + TRAJ_TIE * traj) of (iw, ia) choice-index pairs; NaN where the cap stopped scoring."""
        keys = [self.key(*p) for p in pairs]
        todo, seen = [], set()
        for k, p in zip(keys, pairs):
            if k not in self.cache and k not in seen:
                seen.add(k)
                todo.append((k, p))
        if len(todo) > self.left():
            todo = todo[:int(self.left())]
            self.exhausted = True
        if todo:
            sc = [(to_choice_bits(self.engine, iw), to_choice_bits(self.engine, ia)) for _, (iw, ia) in todo]
            f, t = self.fn(sc)
            f, t = np.asarray(f, np.float64).reshape(-1), np.asarray(t, np.float64).reshape(-1)
            if len(f) != len(sc) or len(t) != len(sc):
                raise ValueError(f"scorer returned {len(f)} / {len(t)} errors for {len(sc)} schedules")
            for (k, _), fi, ti in zip(todo, f, t):
                self.cache[k] = (float(fi), float(ti))
            self.evaluations += len(todo)
        return np.array([float(score(*self.cache[k])) if k in self.cache else np.nan for k in keys])

    def hold(self, n: int) -> None:
        """Keep the last ``n`` evaluations of the cap back (for scoring the final schedule); ``release`` frees them."""
        self._held = 0 if self.cap is None else min(n, self.cap)
        if self.cap is not None:
            self.cap -= self._held

    def release(self) -> None:
        if self.cap is not None:
            self.cap += self._held
        self._held = 0
        self.exhausted = False

    def errors(self, iw: np.ndarray, ia: np.ndarray) -> tuple[float | None, float | None]:
        return self.cache.get(self.key(iw, ia), (None, None))


def _finish(name: str, kind: str, engine: Any, ev: _Evaluator, images: int, budget: float, iw: np.ndarray,
            ia: np.ndarray, t0: float, **extra: Any) -> Baseline:
    bw, ba = to_choice_bits(engine, iw).astype(np.int32), to_choice_bits(engine, ia).astype(np.int32)
    fin, trj = ev.errors(iw, ia)
    info = {"kind": kind, "budget": budget, "evaluations": ev.evaluations,
            "forwards": ev.evaluations * images * engine.num_steps, "images": images,
            "max_evaluations": ev.cap, "capped": ev.exhausted,
            "best_score": None if fin is None else float(score(fin, trj)),
            "train_final_error": fin, "train_traj_error": trj, **extra,
            "cost": schedule_cost(engine, bw, ba), "seconds": time.perf_counter() - t0}
    return Baseline(name, bw, ba, info)


def _setup(engine: Any, bank: Any, budget: float, max_images: int | None, scorer: Scorer | None,
           chunk: int | None, max_evaluations: int | None):
    tab = cost_table(engine)
    budget = check_budget(engine, budget, tab)
    if bank is not None:
        bank = subset(bank, max_images)
    images = 0 if bank is None else int(bank.size)
    return tab, budget, bank, images, _Evaluator(engine, bank, scorer, chunk, max_evaluations)


def _bar(progress: bool, desc: str, total: int | None = None):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


# ------------------------------------------------------------------------------------------ beam search
def search_beam(engine: QuantEngine, bank: ReferenceBank, budget: float, *, beam_width: int = 4,
                candidates: int = 4, segments: int | None = None, start_above: int = 2,
                max_evaluations: int | None = None, scorer: Scorer | None = None, max_images: int | None = None,
                chunk: int | None = None, progress: bool = False) -> Baseline:
    """Beam search over (layer, run-of-steps) blocks on end-to-end train error (AdaTSQ style), tied W/A.
    Name "search_beam".

    Blocks: the S steps are split into ``segments`` contiguous runs (default min(S, 4)); a block is one layer over
    one run (L * segments blocks). Procedure:

    1. Score the uniform schedule at budget (choice c_u; it is a fallback candidate). Start: every entry at
       choice c0 = c_u + ``start_above`` (capped at the top choice), over the budget; score it (s0, cost0).
    2. Expand every beam member that is still over budget: its children lower one block by one choice. A block
       never measured is always tried (so the first expansion sweeps all blocks); of the rest, the
       ``candidates`` blocks with the smallest measured score increase per unit of cost saved (the latest
       measurement of that block at that level, else at the nearest higher level) are tried. Children are
       scored end to end; each measurement updates that block's estimate.
    3. The next beam is the ``beam_width`` best of the children plus the members already within budget, ranked
       by (score - s0) / (cost0 - cost): score increase per unit of cost saved. Repeat 2-3 until every member
       is within budget.
    4. Fill: for each within-budget schedule met (the uniform one included; best ``beam_width`` by score),
       repeatedly score the ``candidates`` single-(step, layer) raises by one choice that fit the remaining
       budget (ranked by their block's estimate) and keep the best if it lowers the score. The best filled
       schedule is returned.

    Cost: about L * segments + expansions * beam_width * candidates + fill evaluations; ``max_evaluations``
    caps it (a search cut short also considers its best beam member greedily repaired to the budget and filled
    with penalties from the measured block estimates, scored with an evaluation kept back for it; the result is
    never worse on the scorer than the uniform schedule at budget once max_evaluations >= 2).
    scorer: (bits_w, bits_a) schedules -> (final, traj) errors (default train_scores on ``bank``).
    info: start_choice, segments, expansions, best_score, train_final_error, evaluations, forwards."""
    if beam_width < 1 or candidates < 1 or start_above < 0:
        raise ValueError(f"need beam_width >= 1, candidates >= 1, start_above >= 0; got {beam_width}, "
                         f"{candidates}, {start_above}")
    t0 = time.perf_counter()
    tab, budget, bank, images, ev = _setup(engine, bank, budget, max_images, scorer, chunk, max_evaluations)
    S, L, C = engine.num_steps, engine.num_layers, tab.shape[1]
    nseg = min(S, 4) if segments is None else int(segments)
    if not 1 <= nseg <= S:
        raise ValueError(f"segments must be in [1, S={S}], got {segments}")
    runs = np.array_split(np.arange(S), nseg)
    blocks = [(l, r) for l in range(L) for r in range(nseg)]
    lim = budget * (1 + TOL)
    cost = lambda iw: traj_cost(tab, iw, iw)
    level = lambda iw, b: int(iw[runs[b[1]][0], b[0]])

    uni = uniform_at_budget(engine, tab, budget)
    c_bud = int(uni[0, 0])
    s_uni = float(ev([(uni, uni)])[0])
    ev.hold(1)  # the final schedule is always scored when the cap allows
    c0 = min(c_bud + start_above, C - 1)
    start = np.full((S, L), c0, np.int64)
    s0 = float(ev([(start, start)])[0])
    cost0 = cost(start)
    bar = _bar(progress, "beam search")

    def saving(iw, b):
        l, r = b
        c = level(iw, b)
        return (tab[l, c, c] - tab[l, c - 1, c - 1]) * len(runs[r]) / S

    proxy: dict[tuple[int, int], float] = {}  # (block, level lowered from) -> score increase per cost saved
    measured: set[int] = set()

    def estimate(iw, bi):
        c = level(iw, blocks[bi])
        for cc in range(c, C):
            if (bi, cc) in proxy:
                return proxy[(bi, cc)]
        return -math.inf

    def rank(item):
        iw, s = item
        saved = cost0 - cost(iw)
        return (s - s0) / saved if saved > 0 else math.inf

    beam = [(start, s0)] if not np.isnan(s0) else []
    within: dict[bytes, tuple[np.ndarray, float]] = {}
    if not np.isnan(s_uni):
        within[uni.tobytes()] = (uni, s_uni)
    if cost0 <= lim and beam:
        within[start.tobytes()] = beam[0]
    expansions = 0
    while beam and not ev.exhausted:
        open_ = [m for m in beam if cost(m[0]) > lim]
        if not open_:
            break
        kids = []
        for iw, s in open_:
            ok = [bi for bi, b in enumerate(blocks) if level(iw, b) > 0]
            new = [bi for bi in ok if bi not in measured]
            rest = sorted((bi for bi in ok if bi in measured), key=lambda bi: (estimate(iw, bi), -saving(iw, blocks[bi])))
            for bi in new + rest[:candidates]:
                l, r = blocks[bi]
                child = iw.copy()
                child[runs[r], l] -= 1
                kids.append((child, iw, s, bi))
        if not kids:
            break
        sc = ev([(k[0], k[0]) for k in kids])
        expansions += 1
        pool: dict[bytes, tuple[np.ndarray, float]] = {m[0].tobytes(): m for m in beam if cost(m[0]) <= lim}
        for (child, parent, ps, bi), cs in zip(kids, sc):
            if np.isnan(cs):
                continue
            proxy[(bi, level(parent, blocks[bi]))] = (cs - ps) / saving(parent, blocks[bi])
            measured.add(bi)
            pool[child.tobytes()] = (child, float(cs))
            if cost(child) <= lim:
                within[child.tobytes()] = (child, float(cs))
        if not pool:
            break
        beam = sorted(pool.values(), key=lambda m: (rank(m), m[0].tobytes()))[:beam_width]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(evals=ev.evaluations, cost=f"{min(cost(m[0]) for m in beam):.4g}")

    def fill_eval(iw, s):
        while not ev.exhausted:
            slack = lim - cost(iw)
            c = iw
            dc = (tab[np.arange(L)[None], np.minimum(c + 1, C - 1), np.minimum(c + 1, C - 1)]
                  - tab[np.arange(L)[None], c, c]) / S
            cand = [(t, l) for t in range(S) for l in range(L) if c[t, l] < C - 1 and dc[t, l] <= slack]
            if not cand:
                break
            seg_of = np.zeros(S, int)
            for r, st in enumerate(runs):
                seg_of[st] = r

            def gain(tl):  # estimated score decrease per unit cost of the raise (bigger first)
                t, l = tl
                p = proxy.get((l * nseg + int(seg_of[t]), int(c[t, l]) + 1))
                return (-(p if p is not None else 0.0), dc[t, l])
            cand = sorted(cand, key=gain)[:candidates]
            kids = []
            for t, l in cand:
                k = iw.copy()
                k[t, l] += 1
                kids.append(k)
            sc = ev([(k, k) for k in kids])
            if np.all(np.isnan(sc)):
                break
            j = int(np.nanargmin(sc))
            if not sc[j] < s:
                break
            iw, s = kids[j], float(sc[j])
        return iw, s

    capped = ev.exhausted
    cands = []
    if beam and any(cost(m[0]) > lim for m in beam):
        # cut short before the beam met the budget: finish its best member greedily on the measured block
        # estimates (a level never measured: the nearest measured one, scaled by 4 per bit below it)
        ch = np.asarray(engine.qcfg.bit_choices, np.float64)
        known = list(proxy.values())
        default = max(float(np.median(known)), 0.0) if known else 1.0
        prio = np.zeros((S, L, C))
        for bi, (l, r) in enumerate(blocks):
            for c in range(C - 2, -1, -1):  # penalty of lowering from c + 1 to c
                cc = next((k for k in range(c + 1, C) if (bi, k) in proxy), None)
                if cc is None:
                    cc = next((k for k in range(c + 1, -1, -1) if (bi, k) in proxy), None)
                est = default if cc is None else max(proxy[(bi, cc)], 0.0) * 4.0 ** (ch[cc] - ch[c + 1])
                drop = est * (tab[l, c + 1, c + 1] - tab[l, c, c]) / S
                prio[runs[r], l, c] = prio[runs[r], l, c + 1] + drop
        iw = min((m for m in beam if cost(m[0]) > lim), key=lambda m: (rank(m), m[0].tobytes()))[0]
        iw, _ = repair(tab, iw, iw, budget, prio, tie=True)
        iw, _ = fill(tab, iw, iw, budget, prio, tie=True)
        ev.release()
        s = float(ev([(iw, iw)])[0])
        ev.hold(0)
        cands.append((iw, s) if not np.isnan(s) else (iw, math.inf))
    tops = sorted(within.values(), key=lambda m: (m[1], m[0].tobytes()))[:beam_width]
    ev.release()
    cands += [fill_eval(*m) for m in tops]
    if cands:
        best = min(cands, key=lambda m: (m[1], m[0].tobytes()))[0]
    else:  # nothing scored (max_evaluations=0): the uniform schedule at budget
        best = uni
    ev.exhausted = ev.exhausted or capped
    if bar is not None:
        bar.close()
    return _finish("search_beam", "search", engine, ev, images, budget, best, best, t0, method="beam",
                   beam_width=beam_width, candidates=candidates, segments=nseg, start_choice=int(c0),
                   start_score=None if np.isnan(s0) else s0, expansions=expansions, within_budget_seen=len(within))


# ------------------------------------------------------------------------------------------ timestep bisection
def timestep_bisection(engine: QuantEngine, bank: ReferenceBank, budget: float, *, tol_iters: int = 24,
                       max_evaluations: int | None = None, scorer: Scorer | None = None,
                       max_images: int | None = None, chunk: int | None = None, progress: bool = False
                       ) -> Baseline:
    """Per-timestep precision by bisection (TMPDiff style): every layer shares a step's tied bits.
    Name "timestep_bisection".

    Reference: every step at the top choice, score s_ref. P(t, c): score with step t at choice c (all layers),
    every other step at the top choice (measured on demand, cached). Procedure:

    1. For a tolerance tau, each step t gets c_t(tau) = the lowest choice with P(t, c) <= s_ref + tau, found by
       bisection over the ordered choice set (assumes P non-increasing in c; ~log2(C) probes per step).
    2. Bisection on tau over [0, max_t P(t, lowest) - s_ref] (``tol_iters`` halvings) for the smallest tau whose
       combined schedule (c_t(tau))_t meets the budget (every probe is cached, so at most S * (C - 1) step probes
       are ever scored).
    3. Refine with the measured table: (a) fill -- repeatedly score the single-step raises by one choice that fit
       the remaining budget and keep the best if it lowers the score; (b) the per-step allocation minimising
       sum_t (P(t, c_t) - s_ref) under the budget (scipy.optimize.milp; unmeasured P(t, c) between measured
       choices take the lower measured neighbour's value, below the lowest measured one they are excluded), then
       filled the same way; (c) the uniform schedule at budget (scored second, right after the reference), filled
       the same way. Of the scored schedules the lowest score wins.

    ``max_evaluations`` caps the schedules scored (one is kept back for scoring the tau-bisection result; a
    search cut short keeps the best scored within-budget combination). scorer: as :func:`search_beam`.
    info: bits_per_step, tolerance, reference_score, probes (step probes scored), best_score, evaluations,
    forwards."""
    from .sensitivity import _solve_milp

    if tol_iters < 1:
        raise ValueError(f"tol_iters must be >= 1, got {tol_iters}")
    t0 = time.perf_counter()
    tab, budget, bank, images, ev = _setup(engine, bank, budget, max_images, scorer, chunk, max_evaluations)
    S, L, C = engine.num_steps, engine.num_layers, tab.shape[1]
    top = C - 1
    lim = budget * (1 + TOL)
    step_cost = tab[:, np.arange(C), np.arange(C)].sum(0)  # (C,) one step at uniform choice c
    fits = lambda prof: float(step_cost[np.asarray(prof)].mean()) <= lim
    sched = lambda prof: np.repeat(np.asarray(prof, np.int64)[:, None], L, 1)
    ref = np.full((S, L), top, np.int64)
    s_ref = float(ev([(ref, ref)])[0])
    uni = tuple(int(c) for c in uniform_at_budget(engine, tab, budget)[:, 0])
    ev([(sched(uni), sched(uni))])
    ev.hold(1)  # keep one evaluation back to score the bisection result
    P: dict[tuple[int, int], float] = {}
    bar = _bar(progress, "timestep bisection", tol_iters)

    def probe(t, c):
        if c == top:
            return s_ref
        if (t, c) not in P:
            iw = ref.copy()
            iw[t] = c
            v = float(ev([(iw, iw)])[0])
            if np.isnan(v):
                return v
            P[(t, c)] = v
        return P[(t, c)]

    def lowest(t, thr):
        lo, hi = 0, top  # the top choice passes by definition
        while lo < hi:
            mid = (lo + hi) // 2
            v = probe(t, mid)
            if np.isnan(v):  # out of evaluations: stay conservative
                return hi
            if v <= thr:
                hi = mid
            else:
                lo = mid + 1
        return hi

    combo = lambda tau: tuple(lowest(t, s_ref + tau) for t in range(S))
    tol_hi = 0.0
    if not np.isnan(s_ref):
        lows = [probe(t, 0) for t in range(S)]
        tol_hi = max([v - s_ref for v in lows if not np.isnan(v)] + [0.0])
    prof_hi = combo(tol_hi) if not np.isnan(s_ref) else uni
    if not fits(prof_hi):  # non-monotone errors or out of evaluations: the uniform schedule at budget
        prof_hi = uni
    tol_lo = -1.0  # combo(tol_lo) infeasible, or tol_hi itself when nothing below it is needed
    prof0 = combo(0.0) if not np.isnan(s_ref) else prof_hi
    if fits(prof0):
        prof_hi, tol_hi = prof0, 0.0
    else:
        tol_lo = 0.0
        for _ in range(tol_iters):
            if ev.exhausted:
                break
            mid = 0.5 * (tol_lo + tol_hi)
            p = combo(mid)
            if fits(p):
                tol_hi, prof_hi = mid, p
            else:
                tol_lo = mid
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tol=f"{tol_hi:.3g}", evals=ev.evaluations)
    if bar is not None:
        bar.close()

    def fill_eval(prof, s):
        prof = list(prof)
        while not ev.exhausted:
            ups = [t for t in range(S) if prof[t] < top and fits(prof[:t] + [prof[t] + 1] + prof[t + 1:])]
            if not ups:
                break
            kids = [tuple(prof[:t] + [prof[t] + 1] + prof[t + 1:]) for t in ups]
            sc = ev([(sched(k), sched(k)) for k in kids])
            if np.all(np.isnan(sc)):
                break
            j = int(np.nanargmin(sc))
            if not sc[j] < s:
                break
            prof, s = list(kids[j]), float(sc[j])
        return tuple(prof), s

    capped = ev.exhausted
    ev.release()
    scored: dict[tuple[int, ...], float] = {}
    starts = [tuple(prof_hi), uni]
    # (b) per-step allocation on the measured table
    pen = np.full((S, C), np.inf)
    for t in range(S):
        pen[t, top] = 0.0
        for c in range(top - 1, -1, -1):
            if (t, c) in P:
                pen[t, c] = P[(t, c)] - s_ref
            elif np.isfinite(pen[t, c + 1]) and any((t, cc) in P for cc in range(c)):
                lower = max(cc for cc in range(c) if (t, cc) in P)
                pen[t, c] = P[(t, lower)] - s_ref
    if not np.isnan(s_ref):
        big = 1e6 * (1.0 + np.abs(pen[np.isfinite(pen)]).max())
        idx = _solve_milp(np.where(np.isfinite(pen), pen, big), np.repeat(step_cost[None] / S, S, 0), budget)
        if idx is not None and np.isfinite(pen[np.arange(S), idx]).all() and fits(idx):
            starts.append(tuple(int(c) for c in idx))
    for p in dict.fromkeys(starts):
        s = float(ev([(sched(p), sched(p))])[0])
        if np.isnan(s):
            continue
        p2, s2 = fill_eval(p, s)
        scored[p] = s
        scored[p2] = s2
    best = min(scored, key=lambda p: (scored[p], p)) if scored else tuple(prof_hi)
    ev.exhausted = ev.exhausted or capped
    iw = sched(best)
    return _finish("timestep_bisection", "timestep", engine, ev, images, budget, iw, iw, t0, method="bisection",
                   bits_per_step=[int(b) for b in to_choice_bits(engine, np.asarray(best))],
                   bisection_bits_per_step=[int(b) for b in to_choice_bits(engine, np.asarray(prof_hi))],
                   tolerance=float(tol_hi), reference_score=None if np.isnan(s_ref) else s_ref, probes=len(P))


# ------------------------------------------------------------------------------------------ first / last n
def first_last_n(engine: QuantEngine, bank: ReferenceBank, budget: float, *, max_evaluations: int | None = None,
                 scorer: Scorer | None = None, max_images: int | None = None, chunk: int | None = None,
                 progress: bool = False) -> Baseline:
    """The step policy runtimes ship (diffusers-style ``first_last_n``): the first n and last n sampler steps at
    high activation precision, the rest at a uniform base. Name "first_last_n"; NOT tied (bits_w != bits_a).

    high = the smallest choice >= 16 bits (else the top choice). For each n in 0..S//2: weights at the base in
    every step; activations at the base in the middle steps and at max(high, base) in the first and last n steps;
    the base is the highest choice whose schedule fits the budget (n skipped if none does). n = 0 is the uniform
    schedule at budget. Each family member is scored end to end (S//2 + 1 evaluations at most, in order of n;
    ``max_evaluations`` caps them) and the lowest score wins (ties: smaller n).
    info: n, base, high (bits), family (n, base, cost, score per member), evaluations, forwards."""
    t0 = time.perf_counter()
    tab, budget, bank, images, ev = _setup(engine, bank, budget, max_images, scorer, chunk, max_evaluations)
    S, L, C = engine.num_steps, engine.num_layers, tab.shape[1]
    ch = np.asarray(engine.qcfg.bit_choices)
    hi_c = int(np.nonzero(ch >= 16)[0].min()) if (ch >= 16).any() else C - 1
    lim = budget * (1 + TOL)
    members = []
    for n in range(S // 2 + 1):
        for c in range(C - 1, -1, -1):
            iw = np.full((S, L), c, np.int64)
            ia = iw.copy()
            edge = np.r_[np.arange(n), np.arange(S - n, S)].astype(int)
            ia[edge] = max(hi_c, c)
            if traj_cost(tab, iw, ia) <= lim:
                members.append((n, c, iw, ia))
                break
    bar = _bar(progress, "first_last_n", len(members))
    family, best = [], None
    for n, c, iw, ia in members:
        s = float(ev([(iw, ia)])[0])
        family.append({"n": n, "base": int(ch[c]), "cost": traj_cost(tab, iw, ia),
                       "score": None if np.isnan(s) else s})
        if not np.isnan(s) and (best is None or s < best[0]):
            best = (s, n, c, iw, ia)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if best is None:  # nothing scored (max_evaluations=0): the uniform schedule at budget
        n, c, iw, ia = members[0]
    else:
        _, n, c, iw, ia = best
    return _finish("first_last_n", "first_last_n", engine, ev, images, budget, iw, ia, t0, n=int(n),
                   base=int(ch[c]), high=int(ch[max(hi_c, c)]), family=family)
