"""Precision profiles: K per-layer bit vectors a deployed runtime holds as K model variants and switches between
per input and step (the env's ``action_space: profiles`` mode picks one per sampler step).

File format (JSON, written atomically; ``format`` ``qpolicy-precision-profiles``, ``version`` 1)::

    {"format": "qpolicy-precision-profiles", "version": 1,
     "model_id": "digits16", "layer_hash": "…", "layer_names": ["down_0/conv_0", …],   # L names, action order
     "bit_choices": [2, 3, 4, 5, 6, 8, 16, 32], "tied": true,
     "profiles": [{"bits_w": [L ints], "bits_a": [L ints],       # bits_a may be left out when tied
                   "cost_rel_fp32": 0.03, "budget": 0.031}, …],   # informative; recomputed on load
     "source": "sensitivity_ilp" | "file" | …, "search": {…}}    # provenance (free form)

Validation (:func:`load_profiles` / :func:`profiles_from_dict`) names the field on every error: the format and
version, the layer count and layer hash against the env's model, each profile's bits against ``bit_choices``,
tied profiles with different W/A bits, duplicates, fewer than 1 or more than :data:`MAX_PROFILES` profiles.

Search (:func:`find_profiles`): the HAWQ-style sensitivity ILP (:mod:`qpolicy.agents.sensitivity`) at K budgets
spread geometrically around a target cost (``target · spread^(k − (K−1)/2)``, clipped to the achievable range),
deduplicated and sorted by cost. One sensitivity measurement serves every budget. :func:`profiles_for` resolves an
env config's profiles (its file, or the search, cached on disk under ``<cache>/profiles/`` keyed by everything that
shapes the result), so they are a reproducible function of the config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bits import to_index
from .io import atomic_write_json, read_cache, read_json, write_cache

PROFILES_FORMAT = "qpolicy-precision-profiles"
PROFILES_VERSION = 1
MAX_PROFILES = 64
#: train-bank images of the sensitivity probes (as the warm start's and the baselines' ILP)
SENS_IMAGES = 16


class ProfileError(ValueError):
    """A profiles file or value that cannot be used (the message names the field)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Profiles:
    """K precision profiles of one model: bits_w, bits_a (K, L) int32 (equal when tied); ``costs`` (K,) the trajectory
    cost_rel_fp32 of running each at every step (filled by the resolver; informative in files)."""

    bits_w: np.ndarray
    bits_a: np.ndarray
    model_id: str
    layer_hash: str
    layer_names: tuple[str, ...]
    bit_choices: tuple[int, ...]
    tied: bool
    costs: tuple[float, ...] | None = None
    budgets: tuple[float | None, ...] | None = None
    source: str = "file"
    search: dict | None = None

    @property
    def K(self) -> int:
        return int(self.bits_w.shape[0])

    @property
    def L(self) -> int:
        return int(self.bits_w.shape[1])

    def indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, L) int32 choice indices of the weights and activations."""
        f = lambda b, side: to_index(b, self.bit_choices, field=f"profiles bits_{side}").astype(np.int32)  # noqa
        return f(self.bits_w, "w"), f(self.bits_a, "a")

    def same_bits(self, other: "Profiles") -> bool:
        return (self.bits_w.shape == other.bits_w.shape and np.array_equal(self.bits_w, other.bits_w)
                and np.array_equal(self.bits_a, other.bits_a))

    def to_dict(self) -> dict:
        profs = []
        for k in range(self.K):
            p: dict[str, Any] = {"bits_w": self.bits_w[k].tolist(), "bits_a": self.bits_a[k].tolist()}
            if self.costs is not None:
                p["cost_rel_fp32"] = float(self.costs[k])
            if self.budgets is not None and self.budgets[k] is not None:
                p["budget"] = float(self.budgets[k])
            profs.append(p)
        return {"format": PROFILES_FORMAT, "version": PROFILES_VERSION, "model_id": self.model_id,
                "layer_hash": self.layer_hash, "layer_names": list(self.layer_names),
                "bit_choices": list(self.bit_choices), "tied": self.tied, "num_profiles": self.K,
                "profiles": profs, "source": self.source, "search": self.search or {}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profiles file atomically (temp file + rename)."""
        return atomic_write_json(path, self.to_dict())


def _where(source: str, field: str) -> str:
    return f"{source}: {field}"


def profiles_from_dict(d: Any, *, source: str = "profiles", layer_names: Sequence[str] | None = None,
                       layer_hash: str | None = None, bit_choices: Sequence[int] | None = None,
                       tied: bool | None = None) -> Profiles:
    """Validate a profiles document (see the module doc); the optional arguments are what the env needs (its
    model's layers and hash, its choice set, tied W/A). ProfileError naming the file and the field otherwise."""
    if not isinstance(d, dict):
        raise ProfileError(f"{source}: a profiles file must hold a JSON object, got {type(d).__name__}")
    if d.get("format") != PROFILES_FORMAT:
        raise ProfileError(f"{_where(source, 'format')} must be {PROFILES_FORMAT!r}, got {d.get('format')!r}")
    if d.get("version") != PROFILES_VERSION:
        raise ProfileError(f"{_where(source, 'version')} must be {PROFILES_VERSION} (this qpolicy reads version "
                           f"{PROFILES_VERSION}), got {d.get('version')!r}")
    for f in ("model_id", "layer_hash"):
        if not isinstance(d.get(f), str) or not d[f]:
            raise ProfileError(f"{_where(source, f)} must be a non-empty string, got {d.get(f)!r}")
    names = d.get("layer_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ProfileError(f"{_where(source, 'layer_names')} must be a non-empty list of layer paths (the registry "
                           f"order), got {names!r}")
    L = len(names)
    if layer_names is not None and L != len(layer_names):
        raise ProfileError(f"{_where(source, 'layer_names')}: the file has {L} layers but the env's model has "
                           f"{len(layer_names)}; find profiles for this model with `qpolicy profiles`")
    if layer_names is not None and list(layer_names) != names:
        bad = next(i for i, (a, b) in enumerate(zip(names, layer_names)) if a != b)
        raise ProfileError(f"{_where(source, 'layer_names')}[{bad}] is {names[bad]!r}, but the model's layer {bad} "
                           f"is {layer_names[bad]!r}: the profiles were made for another model")
    if layer_hash is not None and d["layer_hash"] != layer_hash:
        raise ProfileError(f"{_where(source, 'layer_hash')} {d['layer_hash']} differs from the model's layer-list "
                           f"hash {layer_hash}: the profiles were made for another model")
    from .bits import check_choices

    file_choices = check_choices(d.get("bit_choices"), field=f"{source}: bit_choices", error=ProfileError)
    choices = tuple(bit_choices) if bit_choices is not None else file_choices
    ftied = d.get("tied")
    if not isinstance(ftied, bool):
        raise ProfileError(f"{_where(source, 'tied')} must be true or false, got {ftied!r}")
    if tied is not None and tied and not ftied:
        raise ProfileError(f"{_where(source, 'tied')} is false (separate W/A bits) but the env ties weights and "
                           "activations (tie_weights_activations: true); use tied profiles or set "
                           "tie_weights_activations: false")
    profs = d.get("profiles")
    if not isinstance(profs, list) or not 1 <= len(profs) <= MAX_PROFILES:
        raise ProfileError(f"{_where(source, 'profiles')} must be a list of 1..{MAX_PROFILES} profiles, got "
                           f"{profs if not isinstance(profs, list) else f'{len(profs)} entries'!r}")
    bw, ba, budgets = [], [], []
    for k, p in enumerate(profs):
        at = f"profiles[{k}]"
        if not isinstance(p, dict):
            raise ProfileError(f"{_where(source, at)} must be an object with bits_w (and bits_a), got {p!r}")
        sides = {}
        for side in ("bits_w", "bits_a"):
            v = p.get(side, p.get("bits_w") if side == "bits_a" and ftied else None)
            if v is None:
                raise ProfileError(f"{_where(source, f'{at}.{side}')} is missing (a list of {L} bits)")
            a = np.asarray(v) if isinstance(v, list) else None
            if a is None or a.ndim != 1 or a.dtype == object:
                raise ProfileError(f"{_where(source, f'{at}.{side}')} must be a list of {L} integer bits, got {v!r}")
            if a.shape[0] != L:
                raise ProfileError(f"{_where(source, f'{at}.{side}')} has {a.shape[0]} entries; the model has {L} "
                                   "layers (one entry per layer, in layer_names order)")
            if a.size and not (np.issubdtype(a.dtype, np.integer)
                               or (np.issubdtype(a.dtype, np.floating) and np.all(np.mod(a, 1) == 0))):
                raise ProfileError(f"{_where(source, f'{at}.{side}')} must hold integers, got {a.dtype} values")
            if np.issubdtype(a.dtype, np.bool_):
                raise ProfileError(f"{_where(source, f'{at}.{side}')} must hold integers, got booleans")
            a = a.astype(np.int64)
            bad = [i for i, b in enumerate(a) if int(b) not in choices]
            if bad:
                i = bad[0]
                raise ProfileError(f"{_where(source, f'{at}.{side}')}[{i}] = {int(a[i])} (layer {names[i]!r}) is "
                                   f"not in bit_choices {list(choices)}")
            sides[side] = a
        if ftied and not np.array_equal(sides["bits_w"], sides["bits_a"]):
            raise ProfileError(f"{_where(source, at)}: tied profiles need bits_a == bits_w (or leave bits_a out); "
                               "set tied: false for separate W/A bits")
        if tied and not np.array_equal(sides["bits_w"], sides["bits_a"]):
            raise ProfileError(f"{_where(source, at)} has separate W/A bits but the env ties them")
        bw.append(sides["bits_w"]), ba.append(sides["bits_a"])
        b = p.get("budget")
        budgets.append(float(b) if isinstance(b, (int, float)) and not isinstance(b, bool) else None)
    bw_a, ba_a = np.stack(bw).astype(np.int32), np.stack(ba).astype(np.int32)
    seen: dict[bytes, int] = {}
    for k in range(len(bw)):
        key = bw_a[k].tobytes() + ba_a[k].tobytes()
        if key in seen:
            raise ProfileError(f"{_where(source, f'profiles[{k}]')} repeats profiles[{seen[key]}]: profiles must be "
                               "distinct (a duplicate is an action that means the same thing twice)")
        seen[key] = k
    search = d.get("search") if isinstance(d.get("search"), dict) else {}
    costs = [p.get("cost_rel_fp32") for p in profs]
    costs = tuple(float(c) for c in costs) if all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                  for c in costs) else None
    return Profiles(bits_w=bw_a, bits_a=ba_a, costs=costs, model_id=d["model_id"], layer_hash=d["layer_hash"],
                    layer_names=tuple(names), bit_choices=choices, tied=bool(tied if tied is not None else ftied),
                    budgets=tuple(budgets), source=str(d.get("source", "file")), search=search)


def load_profiles(path: str | os.PathLike, **expect: Any) -> Profiles:
    """Read and validate a profiles file (``expect``: see :func:`profiles_from_dict`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"profiles file not found: {p} (write one with `qpolicy profiles --model M --out "
                                f"{p.name}`, or set env.profiles: null to find them by search)")
    return profiles_from_dict(read_json(p, what="profiles file"), source=str(p), **expect)


# ------------------------------------------------------------------------------------------------ search
def profile_budgets(target: float, K: int, spread: float, lo: float, hi: float) -> list[float]:
    """K budgets target · spread^(k − (K−1)/2), k = 0..K−1 (ascending), clipped into [lo, hi]."""
    return [float(min(max(target * spread ** (k - (K - 1) / 2), lo), hi)) for k in range(K)]


def find_profiles(engine: Any, *, num_profiles: int, budget: float, spread: float = 2.0, tied: bool = True,
                  sens: Any = None, progress: bool = False) -> Profiles:
    """K profiles from the sensitivity ILP at :func:`profile_budgets` (deduplicated, sorted by cost; so possibly
    fewer than K). ``sens``: a precomputed (L, C) sensitivity table, else measured on the first
    :data:`SENS_IMAGES` train-bank images. Profiles are tied W/A bits (bits_a = bits_w) either way."""
    import time

    from .agents.budget import cost_table, min_cost, schedule_cost
    from .agents.sensitivity import layer_sensitivity, sensitivity_mixed_precision
    from .banks import reference_bank

    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if sens is None:
        bank = reference_bank(engine, "train", SENS_IMAGES)
        sens, info = layer_sensitivity(engine, bank, max_images=SENS_IMAGES, progress=progress, return_info=True)
    tab = cost_table(engine)
    lo, hi = min_cost(engine, tab), float(tab.reshape(tab.shape[0], -1).max(1).sum())
    budgets = profile_budgets(budget, num_profiles, spread, lo, hi)
    found: dict[bytes, tuple[np.ndarray, float, float]] = {}
    for b in budgets:
        sol = sensitivity_mixed_precision(engine, sens, b)
        row = np.asarray(sol.bits_w[0], np.int32)
        found.setdefault(row.tobytes(), (row, b, schedule_cost(engine, sol.bits_w, sol.bits_a)))
    rows = sorted(found.values(), key=lambda r: r[2])
    bw = np.stack([r[0] for r in rows])
    den = engine.den
    return Profiles(bits_w=bw, bits_a=bw.copy(), model_id=den.name, layer_hash=den.layer_hash,
                    layer_names=tuple(l.path for l in den.layers), bit_choices=tuple(engine.qcfg.bit_choices),
                    tied=tied, costs=tuple(r[2] for r in rows), budgets=tuple(r[1] for r in rows),
                    source="sensitivity_ilp",
                    search={"target_budget": float(budget), "spread": float(spread), "requested": num_profiles,
                            "budgets": budgets, "sens_images": SENS_IMAGES, "probes": info.get("probes"),
                            "forwards": int(info.get("probes", 0) * info.get("images", 0) * engine.num_steps),
                            "seconds": time.perf_counter() - t0})


def _search_key(cfg: Any, engine: Any) -> str:
    from .denoiser import weights_hash

    q = engine.qcfg
    key = {"model": engine.den.name, "weights": weights_hash(engine.den), "layers": engine.den.layer_hash,
           "sampler": cfg.sampler, "steps": cfg.num_steps, "eta": cfg.eta, "quant_preset": cfg.quant_preset,
           "act_ranges": cfg.act_ranges, "bit_choices": list(q.bit_choices), "cost": cfg.cost,
           "latency_table": cfg.latency_table, "budget": cfg.budget, "num_profiles": cfg.num_profiles,
           "spread": cfg.profile_spread, "tied": cfg.tie_weights_activations, "sens_images": SENS_IMAGES,
           "version": PROFILES_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def with_costs(p: Profiles, engine: Any) -> Profiles:
    """``p`` with its costs computed by the engine's cost model (each profile at every step)."""
    from .agents.budget import schedule_cost

    costs = tuple(schedule_cost(engine, p.bits_w[k][None], p.bits_a[k][None]) for k in range(p.K))
    return dataclasses.replace(p, costs=costs)


def profiles_for(cfg: Any, engine: Any, *, progress: bool = False) -> Profiles:
    """The profiles of an env config (``action_space: profiles``): its ``profiles`` file validated against the
    engine's model and choice set, or (``profiles: null``) :func:`find_profiles` at ``budget`` with
    ``num_profiles`` and ``profile_spread``, cached on disk (a verified cache file) so every process resolves the
    same profiles without searching again."""
    den = engine.den
    names = [l.path for l in den.layers]
    expect = dict(layer_names=names, layer_hash=den.layer_hash, bit_choices=tuple(engine.qcfg.bit_choices),
                  tied=cfg.tie_weights_activations)
    if cfg.profiles is not None:
        return with_costs(load_profiles(cfg.profiles, **expect), engine)
    from .banks import cache_dir

    key = _search_key(cfg, engine)
    path = cache_dir() / "profiles" / f"{den.name}_{key}.json"
    got = read_cache(path, key=key)
    if got is not None:
        try:
            return with_costs(profiles_from_dict(json.loads(got[0]), source=str(path), **expect), engine)
        except (ProfileError, ValueError):
            pass  # recompute below (the write replaces it)
    p = find_profiles(engine, num_profiles=cfg.num_profiles, budget=cfg.budget, spread=cfg.profile_spread,
                      tied=cfg.tie_weights_activations, progress=progress)
    write_cache(path, json.dumps(p.to_dict(), indent=1).encode(), key=key)
    return p


# ------------------------------------------------------------------------------------------------ run folders
#: the precision profiles of a run in ``action_space: profiles`` (what each action means)
PROFILES_FILE = "profiles.json"


def record_run_profiles(env: dict, run_dir: str | os.PathLike, *, progress: bool = False) -> Path | None:
    """Resolve a profile-mode run's profiles (``env``: its EnvConfig fields; the file, or the cached search) and
    write them into the run folder; a resumed run checks they are still those its policy was trained with."""
    from .envs import EnvConfig, profiles_of

    cfg = EnvConfig(**env)
    if cfg.action_space != "profiles":
        return None
    prof = profiles_of(cfg, progress=progress)
    f = Path(run_dir) / PROFILES_FILE
    if f.exists():
        _check_recorded(f, prof)
        return f
    return prof.save(f)


def check_run_profiles(run_dir: str | os.PathLike, env: dict) -> None:
    """ValueError unless the profiles ``env`` resolves to now have the bits recorded in the run folder (a
    policy's action k must keep meaning the profile it was trained with). No-op outside profile mode."""
    if env.get("action_space") != "profiles":
        return
    f = Path(run_dir) / PROFILES_FILE
    if f.exists():
        from .envs import EnvConfig, profiles_of

        _check_recorded(f, profiles_of(EnvConfig(**env)))


def _check_recorded(f: Path, prof: Profiles) -> None:
    rec = profiles_from_dict(read_json(f, what="run profiles"), source=str(f))
    if not rec.same_bits(prof):
        raise ValueError(f"{f}: the run's policy was trained with other precision profiles than its config resolves "
                         f"to now (the env.profiles file changed?); restore that file (or train a new run)")


def profiles_cli(a: Any, *, lines: bool = False) -> Any:
    """`qpolicy profiles`: the env config of ``--config`` / ``--set env.*`` / the flags, in profile mode with the
    profiles found by search (the same cached search a training run of that config uses), written to ``--out``."""
    from .envs import EnvConfig, profiles_of
    from .rundir import check_writable_target
    from .runs import load_config

    run = load_config(a.config, [o if o.startswith("env.") else f"env.{o}" for o in (a.set or [])])
    env = dict(run.env)
    for flag, field in (("model", "model"), ("budget", "budget"), ("num_profiles", "num_profiles"),
                        ("spread", "profile_spread")):
        if getattr(a, flag) is not None:
            env[field] = getattr(a, flag)
    cfg = EnvConfig(**{**env, "action_space": "profiles", "profiles": None})
    check_writable_target(a.out, what="profiles --out")
    prof = profiles_of(cfg, progress=not getattr(a, "json", False))
    out = prof.save(a.out)
    summary = {"path": str(out), "model_id": prof.model_id, "num_profiles": prof.K, "requested": cfg.num_profiles,
               "budget": cfg.budget, "costs": list(prof.costs or ()), "mean_bits": prof.bits_w.mean(1).tolist(),
               "search": prof.search}
    if not lines:
        return summary
    rows = [f"{prof.K} profiles of {prof.model_id} ({prof.L} layers) around cost {cfg.budget:g}: {out}"]
    for k in range(prof.K):
        rows.append(f"  profile {k}: cost_rel_fp32 {prof.costs[k]:.5f}, mean bits {prof.bits_w[k].mean():.2f}")
    return rows
