"""Per-(step, layer) schedule search under a BOPs budget (AdaTSQ style): (mu + lambda) evolution seeded with the
sensitivity ILP, the uniform schedule at budget and any given schedules."""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from qpolicy.banks import ReferenceBank, subset
from qpolicy.engine import QuantEngine

from .budget import (check_budget, cost_table, fill, priority_table, repair, schedule_cost, to_choice_bits,
                     to_choice_index, uniform_at_budget)
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
    info: init_best_score, best_score, train_final_error, evaluations, history (best score per generation)."""
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
            "cost": schedule_cost(engine, best, best), "seconds": time.perf_counter() - t0}
    return Baseline(f"search_{method}", best, best.copy(), info)
