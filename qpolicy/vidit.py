"""ViDiT-Q timestep-wise mixed-precision files, in ViDiT-Q's own layout, and a reader of that layout.

ViDiT-Q (thu-nics/ViDiT-Q) keeps per-step bit widths in two YAML files, one for weights and one for activations
(``t20_weight_4_mp.yaml`` / ``t20_act_8_mp.yaml``), each mapping an **inclusive range of a step index that counts
down** (``"19-15"``: the first five of 20 sampler steps) to ``{torch module name: bits}``. Its quant config's
``mixed_precision`` is the list of **candidate** bit widths (e.g. ``[4, 6, 8]``), not per-layer bits; layers
kept in float are listed in a text file (``part_fp_list``), one module name per line.

qpolicy writes into a folder: ``weight_mp.yaml``, ``act_mp.yaml`` (ranges = maximal runs of steps with equal
weight (resp. activation) bits), ``remain_fp.txt`` (layers at 32 bits for W and A at every step), ``config.yaml``
(the quant config: candidates, quantizer fields, the two files) and ``manifest.json``. Count-down index of
sampler step i: ``T - 1 - i``. Layer names: the schedule's dotted aliases (torch-style module names).
A 32-bit entry of a layer that is quantized at other steps has no ViDiT-Q spelling (bits there are integers):
it is written as the largest integer candidate and listed under ``rounding`` in the manifest.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from .io import atomic_write_json, atomic_write_text
from .schedule import BitSchedule, equal_runs

FP_BITS = 32
FILES = {"weight": "weight_mp.yaml", "act": "act_mp.yaml"}
FP_LIST = "remain_fp.txt"
CONFIG = "config.yaml"


def countdown_key(start: int, end: int, T: int) -> str:
    """The ViDiT-Q key of sampler steps [start, end): "hi-lo", inclusive, in count-down indices."""
    return f"{T - 1 - start}-{T - 1 - (end - 1)}"


def export_vidit(schedule: BitSchedule, out_dir: str | os.PathLike) -> list[Path]:
    """Write the ViDiT-Q files of ``schedule`` into ``out_dir`` (see the module docstring); manifest last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T, L = schedule.T, schedule.L
    names = [schedule.alias(l) for l in range(L)]
    fp_layers = [l for l in range(L) if (schedule.bits_w[:, l] == FP_BITS).all()
                 and (schedule.bits_a[:, l] == FP_BITS).all()]
    q_layers = [l for l in range(L) if l not in fp_layers]
    ints = sorted({int(b) for b in np.concatenate([schedule.bits_w[:, q_layers].ravel(),
                                                    schedule.bits_a[:, q_layers].ravel()]) if b != FP_BITS})
    top = max(ints) if ints else 8
    rounding, written = [], []
    for side, bits in (("weight", schedule.bits_w), ("act", schedule.bits_a)):
        doc = {}
        for start, end in equal_runs(bits[:, q_layers]):
            row = {}
            for l in q_layers:
                b = int(bits[start, l])
                if b == FP_BITS:
                    rounding.append({"file": FILES[side], "steps": [start, end - 1], "layer": names[l],
                                     "requested_bits": b, "exported_bits": top,
                                     "reason": "ViDiT-Q bits are integers; float only for whole layers (remain_fp)"})
                    b = top
                row[names[l]] = b
            doc[countdown_key(start, end, T)] = row
        written.append(atomic_write_text(out / FILES[side], yaml.safe_dump(doc, sort_keys=False)))
    written.append(atomic_write_text(out / FP_LIST, "".join(f"{names[l]}\n" for l in fp_layers)))
    q = schedule.quantizer
    w, a = q["weights"], q["activations"]
    config = {
        "part_fp_list": FP_LIST,
        "model": {"model_id": schedule.model_id},
        "mixed_precision": ints,
        "timestep_wise_mp": {"weight": FILES["weight"], "act": FILES["act"], "num_steps": T,
                             "step_index": "counts down: the first sampler step is T-1, keys are inclusive hi-lo"},
        "quant": {
            "weight": {"quantizer": {"n_bits": top, "per_group": "channel" if w["granularity"] == "channel"
                                     else w["granularity"], "sym": bool(w["symmetric"]), "scale_method": "min_max",
                                     "round_mode": "nearest"}},
            "activation": {"quantizer": {"n_bits": top, "per_group": False if a["granularity"] == "tensor"
                                         else a["granularity"], "sym": bool(a["symmetric"]),
                                         "dynamic": q["act_ranges"] == "dynamic", "scale_method": "min_max",
                                         "round_mode": "nearest"}},
        },
    }
    written.append(atomic_write_text(out / CONFIG, yaml.safe_dump(config, sort_keys=False)))
    written.append(atomic_write_json(out / "manifest.json", {
        "format": "qpolicy-vidit-export", "model_id": schedule.model_id, "layer_hash": schedule.layer_hash,
        "sampler": schedule.sampler, "files": {"config": CONFIG, "weight": FILES["weight"], "act": FILES["act"],
                                               "fp_list": FP_LIST},
        "how_to_use": (f"point ViDiT-Q's quant config at {CONFIG}; sampler step i (0 = noisiest) is ViDiT-Q step "
                       f"index {T - 1} - i; each key 'hi-lo' covers indices hi down to lo inclusive"),
        "rounding": rounding}))
    return written


def read_vidit(out_dir: str | os.PathLike, layer_names: list[str], T: int) -> tuple[np.ndarray, np.ndarray]:
    """(bits_w, bits_a) (T, L) in sampler-step order, read by ViDiT-Q's semantics: count-down inclusive ranges,
    layers in ``remain_fp.txt`` at 32 bits; every range must be covered exactly once and every bit value must be
    one of the config's ``mixed_precision`` candidates."""
    out = Path(out_dir)
    config = yaml.safe_load((out / CONFIG).read_text())
    cand = set(config["mixed_precision"])
    fp = {ln.strip() for ln in (out / config["part_fp_list"]).read_text().splitlines() if ln.strip()}
    res = []
    for side in ("weight", "act"):
        bits = np.full((T, len(layer_names)), -1, np.int64)
        for key, row in yaml.safe_load((out / config["timestep_wise_mp"][side]).read_text()).items():
            hi, lo = (int(v) for v in str(key).split("-"))
            if not T > hi >= lo >= 0:
                raise ValueError(f"{side} range {key!r}: expected 'hi-lo' with {T - 1} >= hi >= lo >= 0")
            for idx in range(lo, hi + 1):
                i = T - 1 - idx
                if (bits[i] != -1).any():
                    raise ValueError(f"{side} step index {idx} is covered twice")
                for l, name in enumerate(layer_names):
                    if name in fp:
                        bits[i, l] = FP_BITS
                    else:
                        if row[name] not in cand:
                            raise ValueError(f"{side} bits {row[name]} of {name} not in mixed_precision {sorted(cand)}")
                        bits[i, l] = row[name]
        if (bits == -1).any():
            raise ValueError(f"{side} file leaves steps {sorted(set(np.nonzero(bits == -1)[0]))} uncovered")
        res.append(bits)
    return res[0], res[1]
