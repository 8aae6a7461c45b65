"""Bit schedules: bits[T, L] for weights and activations plus everything needed to use them elsewhere.

A :class:`BitSchedule` is the exchange format between policies (RL agents, baselines) and the
outside world. Row ``i`` of ``bits_w`` / ``bits_a`` holds the bits of every quantizable layer at
sampler step ``i`` (model timestep ``sampler["timesteps"][i]``); column ``l`` is layer
``layer_names[l]`` in registry (= action) order. 32 bits means float passthrough.

The saved JSON (``format: "qpolicy-bit-schedule"``, ``schema_version: 1``) is documented by
``qpolicy/schemas/bit_schedule.schema.json``. It also carries the derived ``segments`` (maximal
runs of consecutive steps with identical per-layer bits) for tools that know no timesteps; on
load they are checked against the bits (delete the field to have them recomputed).

A *minimal* bits file, ``{"bits_w": [[...], ...], "bits_a": [[...], ...]}`` (T rows of L ints),
is also accepted by :func:`read_bits_file` and :func:`load_schedule_for`.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_json, read_json
from .bits import DEFAULT_BIT_CHOICES, check_bits, check_choices
from .quant import ACT_DEFAULT, ACT_RANGE_MODES, WEIGHT_DEFAULT, QuantSpec

SCHEMA_VERSION = 1
FORMAT = "qpolicy-bit-schedule"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "bit_schedule.schema.json"
SAMPLER_ORDERS = ("descending", "ascending")
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))
_REQUIRED_KEYS = ("format", "schema_version", "model_id", "layer_hash", "layer_names", "sampler", "quantizer",
                  "bits_w", "bits_a")
_OPTIONAL_KEYS = ("layer_aliases", "layer_kinds", "bit_choices", "segments", "summary", "provenance")
_MINIMAL_KEYS = ("bits_w", "bits_a")


class ScheduleError(ValueError):
    """A bad schedule file, bad schedule fields, or a schedule that does not fit this model/sampler."""


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, tuples to lists, non-finite floats to None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise ScheduleError(f"value {obj!r} of type {type(obj).__name__} cannot be stored in a schedule file "
                        "(accepted: numbers, strings, booleans, null, lists and dicts of those)")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _as_bits(value: Any, field: str) -> np.ndarray:
    """A (T, L) int64 array from a nested list / array; ScheduleError naming ``field`` otherwise."""
    accepted = f"{field} must be a T x L integer array (a list of T rows of L ints)"
    try:
        a = np.asarray(value)
    except (ValueError, TypeError):  # ragged rows on newer numpy
        raise ScheduleError(f"{accepted}; its rows have different lengths") from None
    if a.dtype == object:
        raise ScheduleError(f"{accepted}; got ragged rows or non-numeric entries")
    if a.ndim != 2:
        raise ScheduleError(f"{accepted}; got an array with {a.ndim} dimension(s), shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        idx = (0, 0)
        if np.issubdtype(a.dtype, np.floating):
            frac = np.argwhere(np.mod(a, 1) != 0)
            idx = tuple(int(i) for i in frac[0]) if len(frac) else idx
        raise ScheduleError(f"{accepted}; got {a.dtype} values (e.g. {a[idx]!r} at [step {idx[0]}, layer {idx[1]}]); "
                            "write bits as integers such as 4, not 4.0")
    a = a.astype(np.int64)
    a.setflags(write=False)
    return a


def spec_dict(spec: QuantSpec) -> dict:
    """A QuantSpec as a plain dict plus ``family`` ("uniform" or "log2")."""
    d = {"family": "log2" if spec.log2 else "uniform"}
    d.update({k: getattr(spec, k) for k in _SPEC_FIELDS})
    return _jsonable(d)


def quantizer_dict(weights: QuantSpec = WEIGHT_DEFAULT, activations: QuantSpec = ACT_DEFAULT,
                   act_ranges: str = "dynamic") -> dict:
    """The ``quantizer`` field: ``{"weights": {...}, "activations": {...}, "act_ranges": ...}``."""
    if act_ranges not in ACT_RANGE_MODES:
        raise ScheduleError(f"quantizer act_ranges must be one of {ACT_RANGE_MODES}, got {act_ranges!r}")
    return {"weights": spec_dict(weights), "activations": spec_dict(activations), "act_ranges": act_ranges}


def quant_spec_from(d: Mapping, field: str = "quantizer.weights") -> QuantSpec:
    """Rebuild the QuantSpec stored in a quantizer sub-dict (``family`` is derived, not needed)."""
    if not isinstance(d, Mapping):
        raise ScheduleError(f"{field} must be a dict of QuantSpec fields {_SPEC_FIELDS}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_SPEC_FIELDS) - {"family"})
    if unknown:
        raise ScheduleError(f"{field} has unknown key(s) {unknown}; accepted: 'family' and {_SPEC_FIELDS}")
    try:
        spec = QuantSpec(**{k: v for k, v in d.items() if k != "family"})
    except (ValueError, TypeError) as e:
        raise ScheduleError(f"{field}: {e}") from None
    fam = d.get("family")
    if fam is not None and fam != ("log2" if spec.log2 else "uniform"):
        raise ScheduleError(f"{field}.family={fam!r} contradicts log2={spec.log2} "
                            "(accepted: 'uniform' with log2 false, 'log2' with log2 true)")
    return spec


def _check_quantizer(q: Any) -> dict:
    if not isinstance(q, Mapping):
        raise ScheduleError("quantizer must be a dict {'weights': {...}, 'activations': {...}, 'act_ranges': "
                            f"'dynamic'|'static'}}, got {type(q).__name__}")
    missing = [k for k in ("weights", "activations", "act_ranges") if k not in q]
    if missing:
        raise ScheduleError(f"quantizer is missing {missing}; required keys: weights, activations, act_ranges")
    w = quant_spec_from(q["weights"], "quantizer.weights")
    a = quant_spec_from(q["activations"], "quantizer.activations")
    out = quantizer_dict(w, a, q["act_ranges"])
    out.update({k: _jsonable(v) for k, v in q.items() if k not in out})  # keep extra notes (e.g. calibration info)
    return out


def _check_sampler(s: Any, T: int) -> dict:
    if hasattr(s, "to_dict") and not isinstance(s, Mapping):
        s = s.to_dict()
    if not isinstance(s, Mapping):
        raise ScheduleError(f"sampler must be a dict like Sampler.to_dict() (kind, steps, timesteps, order), "
                            f"got {type(s).__name__}")
    missing = [k for k in ("kind", "steps", "timesteps", "order") if k not in s]
    if missing:
        raise ScheduleError(f"sampler is missing {missing}; required keys: kind, steps, timesteps, order")
    s = _jsonable(s)
    if not isinstance(s["kind"], str):
        raise ScheduleError(f"sampler.kind must be a string such as 'ddim', got {s['kind']!r}")
    if not _is_int(s["steps"]) or s["steps"] != T:
        raise ScheduleError(f"sampler.steps={s['steps']!r} must equal the number of bit rows T={T}")
    ts = s["timesteps"]
    if not isinstance(ts, list) or not all(_is_int(t) for t in ts) or len(ts) != T:
        raise ScheduleError(f"sampler.timesteps must be a list of T={T} integers (the model's t at each step), "
                            f"got {ts!r}")
    if s["order"] not in SAMPLER_ORDERS:
        raise ScheduleError(f"sampler.order must be one of {SAMPLER_ORDERS}, got {s['order']!r}")
    d = np.diff(np.asarray(ts))
    if len(d) and not (np.all(d < 0) if s["order"] == "descending" else np.all(d > 0)):
        raise ScheduleError(f"sampler.timesteps {ts} are not strictly {s['order']} as sampler.order says")
    return s


def _layer_name_list(layer_names: Any) -> list[str]:
    return [getattr(n, "path", n) for n in layer_names]


def equal_runs(*arrays: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of consecutive rows (axis 0) on which every array keeps the row it has at start."""
    T = len(arrays[0])
    runs, start = [], 0
    for i in range(1, T + 1):
        if i == T or not all(np.array_equal(a[i], a[start]) for a in arrays):
            runs.append((start, i))
            start = i
    return runs


def _compute_segments(bw: np.ndarray, ba: np.ndarray, timesteps: Sequence[int]) -> list[dict]:
    return [{"start": a, "end": b, "timesteps": [int(t) for t in timesteps[a:b]], "bits_w": bw[a].tolist(),
             "bits_a": ba[a].tolist()} for a, b in equal_runs(bw, ba)]


# --------------------------------------------------------------------------- #
# BitSchedule
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class BitSchedule:
    """bits[T, L] for weights and activations, with the model, sampler and quantizer they were made for.

    bits_w, bits_a: int64 arrays (T, L), read-only; T = sampler steps (row i = step i, model timestep
      ``sampler["timesteps"][i]``), L = layers in registry order. 32 = float passthrough.
    model_id: the denoiser's name. layer_hash: ``qpolicy.layers.layer_hash`` of its registry.
    layer_names: registry paths ("down_0/block_1/conv_0"), len L, in action order.
    layer_aliases: optional other name per path, e.g. the torch/ONNX dotted name "down_0.block_1.conv_0"
      (exporters use it; when absent they use the path with "/" replaced by ".").
    layer_kinds: () or len L (dense, conv, ...).
    sampler: ``Sampler.to_dict()`` — kind, steps (== T), eta, clip_x0, timesteps (len T), order.
    quantizer: ``quantizer_dict(...)`` — {"weights": {family, QuantSpec fields}, "activations": {...},
      "act_ranges": "dynamic" | "static"}.
    bit_choices: accepted bit values (every entry of bits_w / bits_a must be one).
    summary: free-form cost/quality numbers (bops_rel_fp32, final_error, fd, ...).
    provenance: policy name/kind, seed, config, created (ISO time), qpolicy_version, ...
    Equality compares every field (``to_dict()``); instances are not hashable.
    """

    bits_w: np.ndarray
    bits_a: np.ndarray
    model_id: str
    layer_hash: str
    layer_names: tuple[str, ...]
    layer_aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    layer_kinds: tuple[str, ...] = ()
    sampler: dict
    quantizer: dict = dataclasses.field(default_factory=quantizer_dict)
    bit_choices: tuple[int, ...] = DEFAULT_BIT_CHOICES
    summary: dict = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalization)
        bw, ba = _as_bits(self.bits_w, "bits_w"), _as_bits(self.bits_a, "bits_a")
        if bw.shape != ba.shape:
            raise ScheduleError(f"bits_w has shape {bw.shape[0]} x {bw.shape[1]} but bits_a has shape "
                                f"{ba.shape[0]} x {ba.shape[1]}; both must be T x L (steps x layers)")
        T, L = bw.shape
        if T < 1 or L < 1:
            raise ScheduleError(f"bits_w/bits_a must have at least one step (row) and one layer (column), "
                                f"got shape {T} x {L}")
        put("bits_w", bw)
        put("bits_a", ba)
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ScheduleError(f"model_id must be a non-empty string (the denoiser's name), got {self.model_id!r}")
        if not isinstance(self.layer_hash, str) or not self.layer_hash:
            raise ScheduleError(f"layer_hash must be a non-empty string (qpolicy.layers.layer_hash), "
                                f"got {self.layer_hash!r}")
        if isinstance(self.layer_names, str) or not isinstance(self.layer_names, Sequence):
            raise ScheduleError(f"layer_names must be a list of L={L} layer paths, got {self.layer_names!r}")
        names = tuple(_layer_name_list(self.layer_names))
        if len(names) != L or not all(isinstance(n, str) and n for n in names):
            raise ScheduleError(f"layer_names must be {L} non-empty strings (one per bits column), "
                                f"got {len(names)} entries")
        if len(set(names)) != L:
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ScheduleError(f"layer_names must be unique; repeated: {dup}")
        put("layer_names", names)
        if not isinstance(self.layer_aliases, Mapping):
            raise ScheduleError(f"layer_aliases must be a dict {{layer path: alias}}, got {self.layer_aliases!r}")
        aliases = dict(self.layer_aliases)
        unknown = sorted(set(aliases) - set(names))
        if unknown:
            raise ScheduleError(f"layer_aliases has keys that are not in layer_names: {unknown[:5]}")
        if not all(isinstance(v, str) and v for v in aliases.values()):
            raise ScheduleError("layer_aliases values must be non-empty strings")
        put("layer_aliases", aliases)
        kinds = tuple(self.layer_kinds)
        if kinds and (len(kinds) != L or not all(isinstance(k, str) for k in kinds)):
            raise ScheduleError(f"layer_kinds must be empty or {L} strings (one per layer), got {len(kinds)}")
        put("layer_kinds", kinds)
        choices = check_choices(self.bit_choices, error=ScheduleError)
        put("bit_choices", choices)
        check_bits(bw, choices, field="bits_w", names=names, error=ScheduleError)
        check_bits(ba, choices, field="bits_a", names=names, error=ScheduleError)
        put("sampler", _check_sampler(self.sampler, T))
        put("quantizer", _check_quantizer(self.quantizer))
        for field in ("summary", "provenance"):
            v = getattr(self, field)
            if not isinstance(v, Mapping):
                raise ScheduleError(f"{field} must be a dict, got {type(v).__name__}")
            put(field, _jsonable(v))

    # ------------------------------------------------------------------ basics
    @property
    def T(self) -> int:
        """Number of sampler steps (rows)."""
        return int(self.bits_w.shape[0])

    @property
    def L(self) -> int:
        """Number of quantizable layers (columns)."""
        return int(self.bits_w.shape[1])

    @property
    def timesteps(self) -> list[int]:
        return list(self.sampler["timesteps"])

    def alias(self, index_or_path: int | str) -> str:
        """The layer's alias, else its path with "/" replaced by "." (torch/ONNX-style dotted name)."""
        path = self.layer_names[index_or_path] if _is_int(index_or_path) else index_or_path
        return self.layer_aliases.get(path, path.replace("/", "."))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BitSchedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def segments(self) -> list[dict]:
        """Maximal runs of consecutive steps with identical per-layer (bits_w, bits_a) rows.

        Returns ``[{"start": i0, "end": i1 (exclusive), "timesteps": [t_i0 .. t_{i1-1}],
        "bits_w": [L ints], "bits_a": [L ints]}, ...]`` covering steps 0..T-1 in order.
        """
        return _compute_segments(self.bits_w, self.bits_a, self.sampler["timesteps"])

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        """The saved JSON object (plain Python types); see the module docstring and the JSON Schema."""
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "model_id": self.model_id,
            "layer_hash": self.layer_hash,
            "num_steps": self.T,
            "num_layers": self.L,
            "layer_names": list(self.layer_names),
            "layer_aliases": dict(self.layer_aliases),
            "layer_kinds": list(self.layer_kinds),
            "sampler": _jsonable(self.sampler),
            "quantizer": _jsonable(self.quantizer),
            "bit_choices": list(self.bit_choices),
            "bits_w": self.bits_w.tolist(),
            "bits_a": self.bits_a.tolist(),
            "segments": self.segments(),
            "summary": _jsonable(self.summary),
            "provenance": _jsonable(self.provenance),
        }

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "schedule") -> "BitSchedule":
        """Inverse of :meth:`to_dict`; ScheduleError naming the field on any problem."""
        if not isinstance(d, Mapping):
            raise ScheduleError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ScheduleError(f"{source}: format is {d.get('format')!r}, expected {FORMAT!r} "
                                "(a minimal {\"bits_w\": ..., \"bits_a\": ...} file is read by read_bits_file)")
        ver = d.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise ScheduleError(f"{source}: schema_version is {ver!r}; this qpolicy reads schema_version "
                                f"{SCHEMA_VERSION} only")
        missing = [k for k in _REQUIRED_KEYS if k not in d]
        if missing:
            raise ScheduleError(f"{source}: missing field(s) {missing}; required: {list(_REQUIRED_KEYS)}")
        unknown = sorted(set(d) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS) - {"num_steps", "num_layers"})
        if unknown:
            raise ScheduleError(f"{source}: unknown field(s) {unknown}; accepted: "
                                f"{list(_REQUIRED_KEYS) + list(_OPTIONAL_KEYS) + ['num_steps', 'num_layers']}")
        kw = {k: d[k] for k in _REQUIRED_KEYS + _OPTIONAL_KEYS if k in d and k not in ("format", "schema_version",
                                                                                          "segments")}
        for k in ("layer_names", "layer_kinds", "bit_choices"):
            if k in kw:
                if not isinstance(kw[k], list):
                    raise ScheduleError(f"{source}: {k} must be a list, got {type(kw[k]).__name__}")
                kw[k] = tuple(kw[k])
        try:
            sched = cls(**kw)
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None
        for k, v in (("num_steps", sched.T), ("num_layers", sched.L)):
            if k in d and d[k] != v:
                raise ScheduleError(f"{source}: {k}={d[k]!r} but bits_w/bits_a have {v}")
        if "segments" in d and _jsonable(d["segments"]) != sched.segments():
            raise ScheduleError(f"{source}: segments do not match bits_w/bits_a (segments are derived from the "
                                "bits; delete the 'segments' field to have them recomputed)")
        return sched

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (temp file + rename); returns the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitSchedule":
        """Read a schedule JSON; FileNotFoundError if missing, ScheduleError if corrupt or invalid."""
        return cls.from_dict(_read(path), source=f"bit schedule {path}")

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, model_id: str, layer_hash: str, layer_names: Sequence[Any] | None = None) -> None:
        """Raise ScheduleError unless this schedule was made for this model and layer list.

        layer_names: the model's registry paths (or LayerInfo objects); used to explain a mismatch.
        """
        if model_id == self.model_id and layer_hash == self.layer_hash:
            if layer_names is not None and tuple(_layer_name_list(layer_names)) != self.layer_names:
                raise ScheduleError(f"the schedule's layer_names differ from model {model_id!r}'s registry even "
                                    f"though the layer-list hash {layer_hash} matches; the file was edited?")
            return
        msg = (f"this bit schedule was made for model {self.model_id!r} with layer-list hash {self.layer_hash} "
               f"({self.L} layers), but this model is {model_id!r} with layer-list hash {layer_hash}")
        if layer_names is not None:
            names = _layer_name_list(layer_names)
            msg += f" ({len(names)} layers)"
            if len(names) != self.L:
                msg += f"; the layer counts differ ({self.L} vs {len(names)})"
            else:
                diff = next((i for i, (a, b) in enumerate(zip(self.layer_names, names)) if a != b), None)
                if diff is not None:
                    msg += (f"; first differing layer: index {diff}: schedule has {self.layer_names[diff]!r}, "
                            f"model has {names[diff]!r}")
                elif layer_hash != self.layer_hash:
                    msg += "; the layer names match but the layer kinds or weight shapes differ"
        raise ScheduleError(msg + ". Make a schedule for this model (or load it with the model it was made for).")

    def check_sampler(self, sampler: Any) -> None:
        """Raise ScheduleError unless ``sampler`` (Sampler or its dict) runs the same steps and timesteps."""
        s = sampler.to_dict() if hasattr(sampler, "to_dict") else dict(sampler)
        ts = [int(t) for t in s["timesteps"]]
        if len(ts) != self.T:
            raise ScheduleError(f"the bit schedule has T={self.T} steps (timesteps {self.timesteps}) but the sampler "
                                f"runs {len(ts)} steps; make the sampler with {self.T} steps")
        if ts != self.timesteps:
            raise ScheduleError(f"the bit schedule was made for timesteps {self.timesteps} but the sampler uses "
                                f"{ts}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_denoiser(cls, den: Any, sampler: Any, bits_w: Any, bits_a: Any = None, *,
                     quantizer: Mapping | None = None, summary: Mapping | None = None,
                     provenance: Mapping | None = None,
                     bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES) -> "BitSchedule":
        """A schedule for ``den`` (a ``Denoiser``) and ``sampler`` (``Sampler`` or its dict).

        bits_w / bits_a: an int (uniform), an (L,) array (same per-layer bits at every step) or a
        (T, L) array; bits_a=None ties activations to weights. Fills model_id, layer_hash,
        layer_names, layer_kinds and dotted layer_aliases from ``den``; provenance gets ``created``
        (UTC ISO time) and ``qpolicy_version`` unless given.
        """
        s = sampler.to_dict() if hasattr(sampler, "to_dict") else dict(sampler)
        T, L = int(s["steps"]), len(den.layers)

        def full(b, field):
            a = np.asarray(b)
            if a.ndim == 0:
                a = np.full((T, L), a)
            elif a.ndim == 1:
                if a.shape[0] != L:
                    raise ScheduleError(f"{field} given per layer must have L={L} entries, got {a.shape[0]}")
                a = np.broadcast_to(a, (T, L))
            elif a.shape != (T, L):
                raise ScheduleError(f"{field} has shape {a.shape[0]} x {a.shape[1]}; expected T x L = {T} x {L} "
                                    f"(sampler steps x model layers)")
            return a

        bw = full(bits_w, "bits_w")
        ba = bw if bits_a is None else full(bits_a, "bits_a")
        from . import __version__

        prov = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "qpolicy_version": __version__}
        prov.update(provenance or {})
        paths = [l.path for l in den.layers]
        return cls(bits_w=bw, bits_a=ba, model_id=den.name, layer_hash=den.layer_hash, layer_names=tuple(paths),
                   layer_aliases={p: p.replace("/", ".") for p in paths},
                   layer_kinds=tuple(l.kind for l in den.layers), sampler=s,
                   quantizer=quantizer if quantizer is not None else quantizer_dict(),
                   bit_choices=tuple(bit_choices), summary=dict(summary or {}), provenance=prov)

    @classmethod
    def uniform(cls, den: Any, sampler: Any, bits_w: int, bits_a: int | None = None, **kw) -> "BitSchedule":
        """Uniform W{bits_w}A{bits_a} at every layer and step (see :meth:`for_denoiser`)."""
        return cls.for_denoiser(den, sampler, int(bits_w), None if bits_a is None else int(bits_a), **kw)


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #
def _read(path: str | os.PathLike) -> Any:
    try:
        return read_json(path, what="bit schedule")
    except FileNotFoundError:
        raise
    except ValueError as e:
        raise ScheduleError(str(e)) from None


def read_bits_file(path: str | os.PathLike, *, T: int | None = None, L: int | None = None,
                   bit_choices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """bits_w, bits_a (int64, (T, L)) from a full BitSchedule JSON or a minimal
    ``{"bits_w": [[...], ...], "bits_a": [[...], ...]}`` file.

    T, L: expected steps and layers (checked when given). bit_choices: when given, every value
    must be one of them (a full file is always checked against its own bit_choices).
    """
    d = _read(path)
    src = f"bits file {path}"
    if isinstance(d, Mapping) and "format" in d:
        s = BitSchedule.from_dict(d, source=src)
        bw, ba, names = s.bits_w, s.bits_a, s.layer_names
    else:
        if not isinstance(d, Mapping):
            raise ScheduleError(f"{src}: expected a JSON object with keys {list(_MINIMAL_KEYS)}, "
                                f"got {type(d).__name__}")
        missing = [k for k in _MINIMAL_KEYS if k not in d]
        if missing:
            raise ScheduleError(f"{src}: missing field(s) {missing}; a minimal bits file is "
                                "{\"bits_w\": [[T x L ints]], \"bits_a\": [[T x L ints]]} (or a full bit schedule "
                                f"with \"format\": {FORMAT!r})")
        unknown = sorted(set(d) - set(_MINIMAL_KEYS))
        if unknown:
            raise ScheduleError(f"{src}: unknown field(s) {unknown}; a minimal bits file has only "
                                f"{list(_MINIMAL_KEYS)}")
        try:
            bw, ba = _as_bits(d["bits_w"], "bits_w"), _as_bits(d["bits_a"], "bits_a")
        except ScheduleError as e:
            raise ScheduleError(f"{src}: {e}") from None
        names = ()
    for field, a in (("bits_w", bw), ("bits_a", ba)):
        if (T is not None and a.shape[0] != T) or (L is not None and a.shape[1] != L):
            want = f"{T if T is not None else 'T'} x {L if L is not None else 'L'}"
            raise ScheduleError(f"{src}: {field} has shape {a.shape[0]} x {a.shape[1]}; expected {want} "
                                "(sampler steps x model layers)")
    if bw.shape != ba.shape:
        raise ScheduleError(f"{src}: bits_w has shape {bw.shape[0]} x {bw.shape[1]} but bits_a has shape "
                            f"{ba.shape[0]} x {ba.shape[1]}")
    if bit_choices is not None:
        choices = tuple(int(b) for b in bit_choices)
        try:
            check_bits(bw, choices, field="bits_w", names=names, error=ScheduleError)
            check_bits(ba, choices, field="bits_a", names=names, error=ScheduleError)
        except ScheduleError as e:
            raise ScheduleError(f"{src}: {e}") from None
    return bw, ba


def load_schedule_for(path: str | os.PathLike, den: Any, sampler: Any, *,
                      bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
                      quantizer: Mapping | None = None) -> BitSchedule:
    """The schedule in ``path``, checked against ``den`` (Denoiser) and ``sampler`` (Sampler or dict).

    A full file must match the model id, layer-list hash, and the sampler's steps and timesteps.
    A minimal bits file is checked for shape T x L and wrapped with :meth:`BitSchedule.for_denoiser`
    (bit_choices / quantizer apply to that case only).
    """
    d = _read(path)
    if isinstance(d, Mapping) and "format" in d:
        sched = BitSchedule.from_dict(d, source=f"bit schedule {path}")
        sched.check_compatible(den.name, den.layer_hash, [l.path for l in den.layers])
        sched.check_sampler(sampler)
        return sched
    s = sampler.to_dict() if hasattr(sampler, "to_dict") else dict(sampler)
    bw, ba = read_bits_file(path, T=int(s["steps"]), L=len(den.layers))
    return BitSchedule.for_denoiser(den, s, bw, ba, quantizer=quantizer, bit_choices=bit_choices,
                                    provenance={"source": os.fspath(path)})
