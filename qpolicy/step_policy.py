"""``diffusion_step_policy`` for diffusers-style runtimes: v1 (``first_last_n``) and a v2 proposal.

**v1** (what runtimes read today): a diffusers component's ``config.json`` carries
``quantization_config.runtime.diffusion_step_policy = {"schema_version": 1, "type": "first_last_n", "n": n}``:
the first ``n`` and the last ``n`` denoising steps run with 16-bit activations, the others at the checkpoint's
native quantized precision. A qpolicy schedule *fits* v1 when its weights are one row at every step, its
activations are >= 16 bits at every layer on exactly the first and last ``n`` steps, and one native row
elsewhere. Otherwise :func:`nearest_first_last_n` picks the v1 policy closest to the schedule (native row =
per-layer median of the schedule's bits, snapped to its choices; ``n`` minimising the mean |log2| bit distance)
and the export records that policy's error measured under qpolicy's simulation next to the schedule's own.

**v2** (a proposal, documented by ``qpolicy/schemas/diffusion_step_policy_v2.schema.json``): ``type
"per_step_per_layer"`` with the sampler's timesteps, layer names, per-step x per-layer weight and activation
bits (32 = native float), the quantizer, an optional input-adaptive policy network reference, and a v1
fallback for runtimes that only read v1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_json
from .schedule import BitSchedule, quant_spec_from

SCHEMAS = Path(__file__).parent / "schemas"
V1_SCHEMA = SCHEMAS / "diffusion_step_policy_v1.schema.json"
V2_SCHEMA = SCHEMAS / "diffusion_step_policy_v2.schema.json"
HIGH_BITS = 16


def fits_first_last_n(schedule: BitSchedule) -> int | None:
    """The ``n`` of the v1 policy that is exactly this schedule, else None."""
    bw, ba, T = schedule.bits_w, schedule.bits_a, schedule.T
    if not (bw == bw[0]).all():
        return None
    high = (ba >= HIGH_BITS).all(1)
    for n in range(0, T // 2 + 1):
        mask = np.zeros(T, bool)
        mask[:n] = mask[T - n:] = True
        mid = ~mask
        if (high == mask).all() and (not mid.any() or (ba[mid] == ba[mid][0]).all()):
            return n
    return None


def _snap(x: np.ndarray, choices: tuple[int, ...]) -> np.ndarray:
    c = np.asarray(choices)
    return c[np.abs(np.log2(c)[None, :] - np.log2(np.maximum(x, 1))[:, None]).argmin(1)]


def first_last_n_bits(native_w: np.ndarray, native_a: np.ndarray, T: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, L) bits of the v1 policy ``n``: native rows, activations at max(native, 16) on the first/last n steps."""
    bw = np.broadcast_to(native_w, (T, len(native_w))).copy()
    ba = np.broadcast_to(native_a, (T, len(native_a))).copy()
    for i in list(range(n)) + list(range(T - n, T)):
        ba[i] = np.maximum(ba[i], HIGH_BITS)
    return bw, ba


def nearest_first_last_n(schedule: BitSchedule) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, native_w (L,), native_a (L,)) of the v1 policy nearest to ``schedule`` (module docstring)."""
    T = schedule.T
    nw = _snap(np.median(schedule.bits_w, 0), schedule.bit_choices)
    na = _snap(np.median(schedule.bits_a, 0), schedule.bit_choices)

    def dist(n):
        bw, ba = first_last_n_bits(nw, na, T, n)
        return float(np.mean(np.abs(np.log2(bw) - np.log2(schedule.bits_w)))
                     + np.mean(np.abs(np.log2(ba) - np.log2(schedule.bits_a))))

    return min(range(T // 2 + 1), key=dist), nw, na


def measure(schedule: BitSchedule, variants: dict[str, tuple[np.ndarray, np.ndarray]], *, n_images: int = 64,
            den: Any = None, calib_n: int = 32) -> dict[str, float]:
    """Final error (mean over ``n_images`` eval-bank images) of each (bits_w, bits_a) under qpolicy's simulation with
    the schedule's quantizer (its preset when recorded, act ranges, specs; ``calib_n`` calibration images)."""
    from .banks import reference_bank
    from .denoiser import load_denoiser
    from .engine import PTQ_FIELDS, evaluate_schedule, make_engine, quant_config

    den = den or load_denoiser(schedule.model_id)
    q, s = schedule.quantizer, schedule.sampler
    choices = tuple(sorted(set(schedule.bit_choices) | {HIGH_BITS}))
    qcfg = quant_config(q.get("preset", "ptq") if q.get("preset") in ("ptq", "plain") else "ptq",
                        act_ranges=q["act_ranges"], w_spec=quant_spec_from(q["weights"]),
                        a_spec=quant_spec_from(q["activations"], "quantizer.activations"), bit_choices=choices,
                        calib_n=calib_n, **{k: q[k] for k in PTQ_FIELDS if k in q})
    eng = make_engine(den, steps=s["steps"], sampler=s["kind"], eta=float(s.get("eta", 0.0)), qcfg=qcfg)
    bank = reference_bank(eng, "eval", n_images)
    return {k: evaluate_schedule(eng, bank, bw, ba)["final_error"] for k, (bw, ba) in variants.items()}


def v1_policy(n: int) -> dict:
    return {"schema_version": 1, "type": "first_last_n", "n": int(n)}


def export_v1(schedule: BitSchedule, out: str | os.PathLike, *, n_images: int = 64, den: Any = None,
              calib_n: int = 32) -> list[Path]:
    """Write a diffusers component ``config.json`` with the v1 policy (exact, or the nearest one and its measured
    error); qpolicy's record of the choice goes under ``quantization_config.runtime.qpolicy``."""
    out = Path(out)
    if out.is_dir():
        out = out / "config.json"
    n = fits_first_last_n(schedule)
    record: dict[str, Any] = {"exact": n is not None, "model_id": schedule.model_id,
                              "layer_hash": schedule.layer_hash, "sampler_steps": schedule.T}
    if n is None:
        n, nw, na = nearest_first_last_n(schedule)
        errs = measure(schedule, {"schedule": (schedule.bits_w, schedule.bits_a),
                                  "first_last_n": first_last_n_bits(nw, na, schedule.T, n)},
                       n_images=n_images, den=den, calib_n=calib_n)
        record.update({"note": "the schedule is not a first_last_n policy; this is the nearest one",
                       "native_bits_w": nw.tolist(), "native_bits_a": na.tolist(),
                       "final_error_schedule": errs["schedule"], "final_error_first_last_n": errs["first_last_n"],
                       "eval_images": n_images, "calib_images": calib_n})
    cfg = {"quantization_config": {"runtime": {"diffusion_step_policy": v1_policy(n), "qpolicy": record}}}
    return [atomic_write_json(out, cfg)]


def v2_policy(schedule: BitSchedule, *, policy_network: dict | None = None) -> dict:
    """The v2 proposal object for ``schedule`` (see the schema)."""
    n = fits_first_last_n(schedule)
    fallback = v1_policy(n if n is not None else nearest_first_last_n(schedule)[0])
    d = {"schema_version": 2, "type": "per_step_per_layer",
         "sampler": {"kind": schedule.sampler["kind"], "steps": schedule.T, "timesteps": schedule.timesteps},
         "layers": [schedule.alias(l) for l in range(schedule.L)],
         "bits": {"weights": schedule.bits_w.tolist(), "activations": schedule.bits_a.tolist()},
         "float_bits": 32,
         "quantizer": {"weights": schedule.quantizer["weights"], "activations": schedule.quantizer["activations"],
                       "act_ranges": schedule.quantizer["act_ranges"]},
         "model": {"id": schedule.model_id, "layer_hash": schedule.layer_hash},
         "fallback": fallback}
    if policy_network:
        d["policy_network"] = policy_network
    return d


def export_v2(schedule: BitSchedule, out: str | os.PathLike, *, policy_network: dict | None = None) -> list[Path]:
    """Write a diffusers component ``config.json`` with the v2 proposal under the same key as v1."""
    out = Path(out)
    if out.is_dir():
        out = out / "config.json"
    cfg = {"quantization_config": {"runtime": {"diffusion_step_policy": v2_policy(schedule,
                                                                                  policy_network=policy_network)}}}
    return [atomic_write_json(out, cfg)]


def validate(policy: dict) -> None:
    """Validate a ``diffusion_step_policy`` object against the schema of its version (jsonschema)."""
    import jsonschema

    ver = policy.get("schema_version") if isinstance(policy, dict) else None
    path = {1: V1_SCHEMA, 2: V2_SCHEMA}.get(ver)
    if path is None:
        raise ValueError(f"diffusion_step_policy.schema_version must be 1 or 2, got {ver!r}")
    jsonschema.Draft202012Validator(json.loads(path.read_text())).validate(policy)
    if ver == 2:
        T, L = policy["sampler"]["steps"], len(policy["layers"])
        for side in ("weights", "activations"):
            b = policy["bits"][side]
            if len(b) != T or any(len(r) != L for r in b):
                raise ValueError(f"diffusion_step_policy.bits.{side} must be steps x layers = {T} x {L}")
