"""Converters from a :class:`~qpolicy.schedule.BitSchedule` to other tools' formats.

Every converter writes its files atomically (temp name + rename, via :mod:`qpolicy.io`) and returns
the list of paths written.

* ``json``: the BitSchedule itself. ``csv``: one row per (step, layer).
* Per-segment formats, for tools that know no timesteps (``vidit_yaml``, ``modelopt``,
  ``onnxruntime``, ``qwix``): one config file per segment (a maximal run of steps with identical
  per-layer bits) plus ``manifest.json`` that says which file to use at which steps; a sampler
  switches configs at each segment's start step. Segment files are written first and the
  manifest last; files a previous manifest in the same folder listed and this export no longer
  writes are removed (nothing else is touched).

Layer names: ViDiT-Q, ModelOpt and onnxruntime get the torch/ONNX-style dotted alias
(``schedule.alias(l)``, e.g. ``down_0.block_1.conv_0``); Qwix gets the Flax module path regex.
Bits 32 mean float (the layer / tensor is left unquantized in every target).
"""
from __future__ import annotations

import csv
import io as _io
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from .io import atomic_write_json, atomic_write_text
from .schedule import SCHEMA_VERSION, BitSchedule

FP_BITS = 32
SEGMENT_FORMATS = ("vidit_yaml", "modelopt", "onnxruntime", "qwix")
FORMATS = ("json", "csv") + SEGMENT_FORMATS
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "qpolicy-segment-manifest"
CSV_COLUMNS = ("step", "timestep", "layer_index", "layer_path", "layer_alias", "kind", "bits_w", "bits_a")
ONNX_BITS = (4, 8, 16)  # integer widths onnxruntime's QDQ quantizer supports (QInt4/QUInt4 need opset 21)


# --------------------------------------------------------------------------- #
# CSV
# --------------------------------------------------------------------------- #
def to_csv(schedule: BitSchedule, path: str | os.PathLike) -> list[Path]:
    """One row per (step, layer): step, timestep, layer_index, layer_path, layer_alias, kind, bits_w, bits_a.

    T * L data rows after a header row; kind is empty when the schedule has no layer_kinds.
    """
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    kinds = schedule.layer_kinds or ("",) * schedule.L
    for i, t in enumerate(schedule.timesteps):
        for l, name in enumerate(schedule.layer_names):
            w.writerow((i, t, l, name, schedule.alias(l), kinds[l], int(schedule.bits_w[i, l]),
                        int(schedule.bits_a[i, l])))
    return [atomic_write_text(path, buf.getvalue())]


# --------------------------------------------------------------------------- #
# per-segment targets: each returns (file text or JSON object, extension, rounding records)
# --------------------------------------------------------------------------- #
def _vidit_yaml(s: BitSchedule, seg: dict, k: int) -> tuple[Any, str, list]:
    mp, fp = {}, []
    for l in range(s.L):
        bw, ba = seg["bits_w"][l], seg["bits_a"][l]
        if bw == FP_BITS and ba == FP_BITS:
            fp.append(s.alias(l))
        else:
            mp[s.alias(l)] = {"w_bit": None if bw == FP_BITS else bw, "a_bit": None if ba == FP_BITS else ba}
    doc = {
        "model_id": s.model_id,
        "layer_hash": s.layer_hash,
        "segment": {"index": k, "start_step": seg["start"], "end_step": seg["end"], "timesteps": seg["timesteps"]},
        "quant": {"weight": s.quantizer["weights"], "activation": s.quantizer["activations"],
                  "act_ranges": s.quantizer["act_ranges"]},
        "mixed_precision": mp,
        "fp_layers": fp,
    }
    header = ("# ViDiT-Q style mixed-precision config written by qpolicy (one denoising-step segment).\n"
              "# mixed_precision: {layer_name: {w_bit, a_bit}} for quantized layers; w_bit/a_bit null = keep that\n"
              "#   side in float. fp_layers: layers kept fully in float (32 bits for W and A), omitted above.\n"
              f"# Use for sampler steps [{seg['start']}, {seg['end']}) = timesteps {seg['timesteps']}.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None), "yaml", []


def _modelopt_spec(spec: dict, bits: int, weight: bool) -> dict:
    if bits == FP_BITS:
        return {"enable": False}
    if not weight or spec["granularity"] == "tensor":
        return {"num_bits": bits, "axis": None}
    if spec["granularity"] == "group":
        return {"num_bits": bits, "block_sizes": {-1: spec["group_size"]}}
    return {"num_bits": bits, "axis": 0}  # torch weights keep the output channel first


def _modelopt(s: BitSchedule, seg: dict, k: int) -> tuple[Any, str, list]:
    cfg = {}
    # ModelOpt applies wildcard entries in order, later ones winning; shorter aliases first so that a
    # longer alias containing a shorter one overrides it for its own modules.
    for l in sorted(range(s.L), key=lambda l: (len(s.alias(l)), l)):
        a = s.alias(l)
        cfg[f"*{a}*weight_quantizer"] = _modelopt_spec(s.quantizer["weights"], seg["bits_w"][l], True)
        cfg[f"*{a}*input_quantizer"] = _modelopt_spec(s.quantizer["activations"], seg["bits_a"][l], False)
    cfg["default"] = {"enable": False}
    return {"quant_cfg": cfg, "algorithm": "max"}, "json", []


def _onnx_type(bits: int, signed: bool) -> tuple[str, int]:
    b = next(x for x in ONNX_BITS if x >= bits)
    return ("QInt" if signed else "QUInt") + str(b), b


def _onnxruntime(s: BitSchedule, seg: dict, k: int) -> tuple[Any, str, list]:
    out, rounding = {}, []
    for l in range(s.L):
        a = s.alias(l)
        for tensor, side, bits in (("weight", "weights", seg["bits_w"][l]), ("input", "activations",
                                                                               seg["bits_a"][l])):
            if bits == FP_BITS:
                continue  # no override: leave it to the quantizer's op_types_to_quantize / nodes_to_exclude
            spec = s.quantizer[side]
            qtype, eb = _onnx_type(bits, spec["symmetric"])
            entry = {"quant_type": qtype, "symmetric": bool(spec["symmetric"])}
            if tensor == "weight" and spec["granularity"] != "tensor":
                entry["axis"] = 0
            out[f"{a}.{tensor}"] = [entry]
            if eb != bits:
                rounding.append({"segment": k, "tensor": f"{a}.{tensor}", "requested_bits": bits,
                                 "exported_bits": eb, "quant_type": qtype})
    return out, "json", rounding


def _qwix_qtype(bits: int) -> str | None:
    return None if bits == FP_BITS else f"int{bits}"


def _qwix(s: BitSchedule, seg: dict, k: int) -> tuple[Any, str, list]:
    rules = []
    for l, path in enumerate(s.layer_names):
        bw, ba = seg["bits_w"][l], seg["bits_a"][l]
        if bw == FP_BITS and ba == FP_BITS:
            continue  # no rule matches -> Qwix leaves the module in float
        rules.append({"module_path": f"^{re.escape(path)}$", "weight_qtype": _qwix_qtype(bw),
                      "act_qtype": _qwix_qtype(ba)})
    return rules, "json", []


_TARGETS: dict[str, tuple[Callable, str, list[str]]] = {
    "vidit_yaml": (_vidit_yaml, "ViDiT-Q style mixed-precision YAML", [
        "Keys: mixed_precision = {dotted layer name: {w_bit, a_bit}} (null = that side stays float); "
        "fp_layers = layers with 32-bit W and A, left out of quantization; quant = the quantizer spec "
        "(family, symmetric, granularity, ...) the bits were chosen with.",
    ]),
    "modelopt": (_modelopt, "NVIDIA ModelOpt quant_cfg (mtq.quantize(model, config, forward_loop))", [
        "Each file is a ModelOpt config dict {'quant_cfg': {...}, 'algorithm': 'max'}; keys are wildcard "
        "patterns on dotted module names, 32-bit tensors get {'enable': False}, everything unlisted is "
        "disabled by 'default'.",
        "Weights: per-output-channel (axis 0 of a torch weight) when the schedule's weight granularity is "
        "'channel', block_sizes {-1: group_size} for 'group'. ModelOpt integer quantizers are symmetric; an "
        "asymmetric activation spec is approximated by a symmetric one.",
    ]),
    "onnxruntime": (_onnxruntime, "onnxruntime TensorQuantOverrides (extra_options['TensorQuantOverrides'])", [
        "Keys '<layer>.weight' / '<layer>.input' name the layer's weight initializer and input activation "
        "tensor; rename them to the tensor names of your exported ONNX graph if they differ.",
        "onnxruntime supports 4, 8 and 16-bit integer types only: other bit widths are rounded up to the next "
        "supported type (listed under 'rounding'); 32-bit tensors get no entry (keep them in float with "
        "nodes_to_exclude). QInt4/QUInt4 need opset >= 21.",
        "'axis': 0 is the output-channel axis of a torch-layout weight (Conv, Gemm with transB=1); use axis 1 "
        "for a MatMul weight stored as (in, out).",
    ]),
    "qwix": (_qwix, "Qwix QtRule list (qwix.QtRule(**rule) for each entry)", [
        "module_path is an anchored regex of the Flax module path; weight_qtype/act_qtype are 'int{bits}' "
        "(null = keep float); layers with 32-bit W and A have no rule, so Qwix leaves them in float.",
        "Qwix fixes bit widths at trace time: build one quantized model per segment and switch models at the "
        "segment start steps. 'int3'/'int5'/'int6'/'int7' are not jnp dtypes; map them to a supported qtype "
        "(e.g. int4/int8) if your Qwix version rejects them.",
    ]),
}


def _segment_file(k: int, seg: dict, ext: str) -> str:
    return f"segment_{k:03d}_steps_{seg['start']:04d}-{seg['end'] - 1:04d}.{ext}"


def _previous_files(out_dir: Path) -> set[str]:
    m = out_dir / MANIFEST_NAME
    try:
        import json

        d = json.loads(m.read_text())
        if d.get("format") == MANIFEST_FORMAT:
            return {seg["file"] for seg in d.get("segments", []) if isinstance(seg.get("file"), str)
                    and "/" not in seg["file"] and seg["file"].startswith("segment_")}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return set()


def export_segments(schedule: BitSchedule, out_dir: str | os.PathLike, fmt: str) -> list[Path]:
    """One ``fmt`` config file per segment plus ``manifest.json`` in ``out_dir``; returns the paths (manifest last).

    fmt: one of ``SEGMENT_FORMATS``. The manifest lists every segment (index, start/end step with end
    exclusive, timesteps, file), ``step_to_segment`` (length T), the switch steps, how to use the
    files, notes on the target, and any bit-width rounding the target forced.
    """
    if fmt not in _TARGETS:
        raise ValueError(f"segment export format must be one of {SEGMENT_FORMATS}, got {fmt!r}")
    fn, target, notes = _TARGETS[fmt]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = _previous_files(out_dir)
    segs = schedule.segments()
    written, entries, rounding = [], [], []
    for k, seg in enumerate(segs):
        content, ext, rnd = fn(schedule, seg, k)
        name = _segment_file(k, seg, ext)
        p = out_dir / name
        written.append(atomic_write_text(p, content) if isinstance(content, str) else atomic_write_json(p, content))
        rounding.extend(rnd)
        entries.append({"index": k, "start": seg["start"], "end": seg["end"],
                        "steps": list(range(seg["start"], seg["end"])), "timesteps": seg["timesteps"],
                        "file": name})
    step_to_segment = [k for k, seg in enumerate(segs) for _ in range(seg["start"], seg["end"])]
    switch = [seg["start"] for seg in segs[1:]]
    manifest = {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "target": fmt,
        "target_description": target,
        "model_id": schedule.model_id,
        "layer_hash": schedule.layer_hash,
        "sampler": schedule.sampler,
        "num_steps": schedule.T,
        "num_layers": schedule.L,
        "how_to_use": (
            f"Run the {schedule.sampler['kind']} sampler for {schedule.T} steps over timesteps "
            f"{schedule.timesteps} (step i uses timesteps[i]). Before step i, load the config file of the segment "
            f"with start <= i < end (step_to_segment[i]); that is, switch configs at steps {switch or 'never'}. "
            "Steps are sampler step indices, not model timesteps."),
        "switch_steps": switch,
        "step_to_segment": step_to_segment,
        "segments": entries,
        "notes": notes,
        "rounding": rounding,
        "summary": schedule.summary,
        "provenance": schedule.provenance,
    }
    written.append(atomic_write_json(out_dir / MANIFEST_NAME, manifest))
    keep = {p.name for p in written}
    for name in sorted(stale - keep):
        try:
            (out_dir / name).unlink()
        except FileNotFoundError:
            pass
    return written


def export(schedule: BitSchedule, out: str | os.PathLike, fmt: str) -> list[Path]:
    """Write ``schedule`` as ``fmt``; returns the paths written.

    json / csv: ``out`` is the file (or an existing folder, which gets bit_schedule.json/.csv).
    vidit_yaml / modelopt / onnxruntime / qwix: ``out`` is a folder (see :func:`export_segments`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    if fmt in ("json", "csv"):
        if out.is_dir():
            out = out / f"bit_schedule.{fmt}"
        return [schedule.save(out)] if fmt == "json" else to_csv(schedule, out)
    if out.is_file() or (out.suffix and not out.is_dir()):
        raise ValueError(f"export --out {out}: format {fmt!r} writes a folder (one file per segment and a manifest); "
                         "give a folder path, e.g. without a file suffix")
    return export_segments(schedule, out, fmt)
