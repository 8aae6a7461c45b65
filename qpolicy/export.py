"""Converters from a :class:`~qpolicy.schedule.BitSchedule` to other tools' formats.

Every converter writes its files atomically (temp name + rename, via :mod:`qpolicy.io`) and returns
the list of paths written.

Single-file formats (``--out`` is a file): ``json`` (the BitSchedule itself), ``csv`` (one row per (step,
layer)), ``step_policy`` (a diffusers component config.json with ``diffusion_step_policy`` v1) and
``step_policy_v2`` (the v2 proposal), see :mod:`qpolicy.step_policy`.
Multi-file formats (``--out`` is a folder): ``vidit`` (ViDiT-Q's own layout, :mod:`qpolicy.vidit`) and the
per-segment formats for tools that know no timesteps (``modelopt``, ``onnxruntime``, ``qwix``): one config file
per segment (a maximal run of steps with identical
  per-layer bits) plus ``manifest.json`` that says which file to use at which steps; a sampler
  switches configs at each segment's start step. Segment files are written first and the
  manifest last; files a previous manifest in the same folder listed and this export no longer
  writes are removed (nothing else is touched). A folder export holds the folder's lock
  (:func:`qpolicy.rundir.locked`, ``.qpolicy.lock``): a second writer to the same folder is refused.

Layer names: ViDiT-Q, ModelOpt, onnxruntime and the step policies get the torch/ONNX-style dotted alias
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

import numpy as np

from .io import atomic_write_json, atomic_write_text
from .rundir import locked
from .schedule import SCHEMA_VERSION, BitSchedule

FP_BITS = 32
SEGMENT_FORMATS = ("modelopt", "onnxruntime", "qwix")
#: single-file formats: --out is a file (an existing folder gets the default name)
FILE_FORMATS = ("json", "csv", "step_policy", "step_policy_v2")
#: multi-file formats: --out is a folder
#: "policy_onnx" needs a run (its policy network): qpolicy.runs.export_run
DIR_FORMATS = ("vidit",) + SEGMENT_FORMATS + ("policy_onnx",)
FORMATS = FILE_FORMATS + DIR_FORMATS
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "qpolicy-segment-manifest"
CSV_COLUMNS = ("step", "timestep", "layer_index", "layer_path", "layer_alias", "kind", "bits_w", "bits_a")


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
def _modelopt_spec(spec: dict, bits: int, weight: bool, kind: str) -> tuple[dict, str | None]:
    """(ModelOpt QuantizerAttributeConfig dict, note or None) of one tensor at ``bits`` (< 32)."""
    if not weight:
        return {"num_bits": bits, "axis": None}, None
    cfg = {"num_bits": bits, "narrow_range": True}
    if spec["granularity"] == "group" and kind in ("dense", "dense_general"):
        return {**cfg, "block_sizes": {-1: int(spec["group_size"])}}, None  # torch Linear (out, in): groups of in
    note = "group granularity on a non-dense layer exported per output channel" if spec["granularity"] == "group" \
        else None
    return {**cfg, "axis": None if spec["granularity"] == "tensor" else 0}, note  # torch weights: out channel first


def _modelopt(s: BitSchedule, seg: dict, k: int) -> tuple[Any, str, list]:
    # ModelOpt >= 0.4x: quant_cfg is a list applied in order, later entries winning: disable every quantizer
    # first, then enable each layer's own quantizers by their exact torch names (no trailing catch-all).
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    notes = []
    kinds = s.layer_kinds or ("",) * s.L
    for l in range(s.L):
        a = s.alias(l)
        for side, tensor, bits in (("weights", "weight_quantizer", seg["bits_w"][l]),
                                   ("activations", "input_quantizer", seg["bits_a"][l])):
            if bits == FP_BITS:
                continue
            cfg, note = _modelopt_spec(s.quantizer[side], bits, side == "weights", kinds[l])
            entries.append({"quantizer_name": f"{a}.{tensor}", "cfg": cfg})
            if note:
                notes.append({"segment": k, "tensor": f"{a}.{tensor}", "note": note})
    return {"quant_cfg": entries, "algorithm": "max"}, "json", notes


def read_modelopt(path: str | os.PathLike) -> dict:
    """A ModelOpt segment file as the config dict ``mtq.quantize`` takes: JSON turns the integer axis keys of
    ``block_sizes`` into strings, which ModelOpt rejects; this turns them back."""
    from .io import read_json

    cfg = read_json(path, what="ModelOpt config")
    for e in cfg.get("quant_cfg", []):
        bs = (e.get("cfg") or {}).get("block_sizes")
        if isinstance(bs, dict):
            e["cfg"]["block_sizes"] = {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in bs.items()}
    return cfg


def _onnxruntime(s: BitSchedule, seg: dict, k: int) -> tuple[Any, str, list]:
    from .ort_runtime import ort_bits

    bw, ba, rnd = ort_bits(np.asarray([seg["bits_w"]]), np.asarray([seg["bits_a"]]), list(s.layer_names))
    out = {}
    kinds = s.layer_kinds or ("",) * s.L
    for l in range(s.L):
        a = s.alias(l)
        if bw[0, l] == FP_BITS:
            continue  # no override and not in nodes_to_quantize: the node stays float
        w = s.quantizer["weights"]
        entry = {"quant_type": f"QInt{bw[0, l]}", "symmetric": True}
        if w["granularity"] != "tensor":
            entry["axis"] = 0 if kinds[l].startswith("conv") else 1  # Conv OIHW; Gemm B stored (in, out)
        out[f"{a}.weight"] = [entry]
        act = s.quantizer["activations"]
        out[f"{a}.input"] = [{"quant_type": f"{'QInt' if act['symmetric'] else 'QUInt'}{ba[0, l]}",
                              "symmetric": bool(act["symmetric"])}]
    rounding = [{"segment": k, "tensor": f"{s.alias(r['layer'])}.{'weight' if r['side'] == 'weight' else 'input'}",
                 "requested_bits": r["requested_bits"], "exported_bits": r["exported_bits"], "reason": r["reason"]}
                for r in rnd]
    return out, "json", rounding


def read_onnxruntime(path: str | os.PathLike) -> dict[str, list[dict]]:
    """An onnxruntime segment file as ``extra_options["TensorQuantOverrides"]``: quant_type names -> QuantType
    enums (JSON holds names)."""
    from onnxruntime.quantization import QuantType

    from .io import read_json

    d = read_json(path, what="onnxruntime TensorQuantOverrides")
    return {t: [{**e, "quant_type": QuantType[e["quant_type"]]} if "quant_type" in e else e for e in v]
            for t, v in d.items()}


#: Qwix 0.1.8's fake-quant (QtProvider) forward runs int5..int8 on XLA CPU; int2/int3/int4 operands fail there
#: (XLA CPU rejects the sub-byte converts), and 16-bit is not a Qwix qtype.
QWIX_MIN_INT, QWIX_MAX_INT = 5, 8


def qwix_bits(bw: int, ba: int, kind: str) -> tuple[int, int, str | None]:
    """(weight bits, act bits, reason or None) Qwix can run for one layer (rule in the module docstring)."""
    w, a = bw, ba
    reasons = []
    if min(w, a) < QWIX_MIN_INT:
        w, a = max(w, QWIX_MIN_INT), max(a, QWIX_MIN_INT)
        reasons.append(f"int2-int4 do not run in Qwix's fake-quant forward on CPU: rounded up to int{QWIX_MIN_INT}")
    if FP_BITS not in (w, a) and max(w, a) > QWIX_MAX_INT:
        w, a = (FP_BITS if w > QWIX_MAX_INT else w), (FP_BITS if a > QWIX_MAX_INT else a)
        reasons.append("16-bit is not a Qwix qtype: that side stays float")
    if kind.startswith("conv") and w != a and FP_BITS not in (w, a):
        w = a = max(w, a)
        reasons.append("Qwix convs need one qtype for weight and activation: both take the larger")
    if (w == FP_BITS) != (a == FP_BITS):
        w = a = FP_BITS
        reasons.append("a Qwix rule quantizes both operands or none: the layer stays float")
    return w, a, "; ".join(reasons) or None


def _qwix(s: BitSchedule, seg: dict, k: int) -> tuple[Any, str, list]:
    rules, rounding = [], []
    kinds = s.layer_kinds or ("",) * s.L
    for l, path in enumerate(s.layer_names):
        bw, ba, why = qwix_bits(seg["bits_w"][l], seg["bits_a"][l], kinds[l])
        if why:
            rounding.append({"segment": k, "layer": path, "requested_bits": [seg["bits_w"][l], seg["bits_a"][l]],
                             "exported_bits": [bw, ba], "reason": why})
        if bw == FP_BITS and ba == FP_BITS:
            continue  # no rule matches -> Qwix leaves the module in float
        rules.append({"module_path": f"^{re.escape(path)}$", "weight_qtype": f"int{bw}", "act_qtype": f"int{ba}"})
    return rules, "json", rounding


_TARGETS: dict[str, tuple[Callable, str, list[str]]] = {
    "modelopt": (_modelopt, "NVIDIA ModelOpt quant_cfg (mtq.quantize(model, read_modelopt(file), forward_loop))", [
        "Each file is a ModelOpt config {'quant_cfg': [entries], 'algorithm': 'max'} in the list format ModelOpt "
        "applies in order (later entries win): first {'quantizer_name': '*', 'enable': False}, then each layer's "
        "'<torch module name>.weight_quantizer' / '.input_quantizer' with its bits; 32-bit tensors stay disabled.",
        "Weights: narrow-range symmetric, per output channel (axis 0 of a torch weight) for 'channel', block_sizes "
        "{-1: group_size} on Linear layers for 'group' (other layers per channel, listed under rounding). Load a "
        "file with qpolicy.export.read_modelopt (JSON stores the block_sizes axis as a string). ModelOpt integer "
        "quantizers are symmetric; an asymmetric activation spec is approximated by a symmetric one.",
    ]),
    "onnxruntime": (_onnxruntime, "onnxruntime TensorQuantOverrides (extra_options['TensorQuantOverrides'])", [
        "Keys '<layer>.weight' / '<layer>.input' are the tensor names of the ONNX model qpolicy exports "
        "(qpolicy.onnx_export: jax2onnx + name map); read a file with qpolicy.export.read_onnxruntime to get "
        "QuantType enums, and pass nodes_to_quantize = the layers listed.",
        "onnxruntime QDQ runs 8 and 16-bit integers here: other widths are rounded up (listed under 'rounding'); "
        "32-bit layers get no entry and stay float. 'axis' is the output-channel axis of the ONNX weight: 0 for "
        "Conv (OIHW), 1 for Gemm (B stored (in, out)). `qpolicy deploy onnx` builds and runs these models.",
    ]),
    "qwix": (_qwix, "Qwix QtRule list (qwix.QtRule(**rule) for each entry)", [
        "module_path is an anchored regex of the Flax module path; weight_qtype/act_qtype are 'int{bits}'; layers "
        "with 32-bit W and A have no rule, so Qwix leaves them in float.",
        "Mapped choices (listed under 'rounding'): 2-4 bits become int5 (Qwix 0.1.8's fake-quant forward fails on "
        "XLA CPU for sub-byte qtypes); 16-bit sides stay float (not a Qwix qtype); a conv with "
        "different W and A widths takes the larger for both; a layer with one float side stays float. Qwix fixes "
        "bit widths at trace time: build one quantized model per segment and switch at the segment start steps.",
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


def export(schedule: BitSchedule, out: str | os.PathLike, fmt: str, *, den: Any = None,
           policy_network: dict | None = None) -> list[Path]:
    """Write ``schedule`` as ``fmt``; returns the paths written.

    FILE_FORMATS (json, csv, step_policy, step_policy_v2): ``out`` is the file (an existing folder gets
    bit_schedule.json / bit_schedule.csv / config.json). DIR_FORMATS (vidit, modelopt, onnxruntime, qwix): ``out``
    is a folder. ``step_policy`` measures the nearest first_last_n policy with the schedule's model when the
    schedule is not one (``den``: that Denoiser, loaded by model id when None).
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    if fmt in DIR_FORMATS and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, but format {fmt!r} writes several files: give a folder")
    if fmt in ("json", "csv"):
        if out.is_dir():
            out = out / f"bit_schedule.{fmt}"
        return [schedule.save(out)] if fmt == "json" else to_csv(schedule, out)
    if fmt in ("step_policy", "step_policy_v2"):
        from . import step_policy

        if fmt == "step_policy":
            return step_policy.export_v1(schedule, out, den=den)
        return step_policy.export_v2(schedule, out, policy_network=policy_network)
    if fmt == "policy_onnx":
        raise ValueError("format 'policy_onnx' exports a run's policy network: use qpolicy.runs.export_run "
                         "(`qpolicy export --run DIR --format policy_onnx`)")
    if out.is_file() or (out.suffix and not out.is_dir()):
        raise ValueError(f"export --out {out}: format {fmt!r} writes a folder (one file per segment and a manifest); "
                         "give a folder path, e.g. without a file suffix")
    with locked(out, what="export --out folder"):  # one writer at a time (a second one is refused, naming the first)
        if fmt == "vidit":
            from .vidit import export_vidit

            return export_vidit(schedule, out)
        return export_segments(schedule, out, fmt)
