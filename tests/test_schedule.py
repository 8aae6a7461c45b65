"""Tests for qpolicy.schedule (BitSchedule, bits files) and qpolicy.export (converters)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from conftest import require
from qpolicy.export import FORMATS, SEGMENT_FORMATS, export, export_segments, to_csv
from qpolicy.layers import LayerInfo, layer_hash
from qpolicy.rundir import LOCK_FILE
from qpolicy.schedule import (
    FORMAT,
    SCHEMA_PATH,
    SCHEMA_VERSION,
    BitSchedule,
    ScheduleError,
    load_schedule_for,
    read_bits_file,
)

TIMESTEPS = [999, 799, 599, 399, 199, 0]
A, B = [4, 8, 32], [2, 16, 8]  # two per-layer rows


def _layer(i, path, kind, shape):
    return LayerInfo(index=i, path=path, kind=kind, weight_shape=shape, weight_names=("kernel",),
                     params=int(np.prod(shape)), macs=int(np.prod(shape)) * 4)


def fake_den(name="fake3", paths=("conv_in", "mid/attn/qkv", "up_0/block_1/conv_0")):
    layers = (_layer(0, paths[0], "conv", (3, 3, 1, 8)), _layer(1, paths[1], "dense", (8, 24)),
              _layer(2, paths[2], "conv", (3, 3, 8, 1)))
    return SimpleNamespace(name=name, layers=layers, layer_hash=layer_hash(layers), metadata={})


def fake_sampler(ts=TIMESTEPS):
    return {"kind": "ddim", "steps": len(ts), "eta": 0.0, "clip_x0": True, "timesteps": list(ts),
            "order": "descending"}


def hand_schedule(**kw):
    rows = [A, A, B, B, B, A]
    return BitSchedule.for_denoiser(fake_den(), fake_sampler(), np.array(rows), np.array(rows)[:, ::-1],
                                    summary={"bops_rel_fp32": np.float32(0.12), "final_error": 1e-3},
                                    provenance={"policy": "hand", "seed": 0}, **kw)


def no_temp_files(folder: Path):
    return not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- #
# BitSchedule
# --------------------------------------------------------------------------- #
def test_round_trip_and_fields(tmp_path):
    s = hand_schedule()
    assert (s.T, s.L) == (6, 3)
    assert s.bits_w.dtype == np.int64 and not s.bits_w.flags.writeable
    assert s.layer_aliases["up_0/block_1/conv_0"] == "up_0.block_1.conv_0"
    assert s.provenance["policy"] == "hand" and "created" in s.provenance and "qpolicy_version" in s.provenance
    p = s.save(tmp_path / "sched.json")
    assert no_temp_files(tmp_path)
    d = json.loads(p.read_text())
    assert d["format"] == FORMAT and d["schema_version"] == SCHEMA_VERSION
    assert isinstance(d["summary"]["bops_rel_fp32"], float)
    s2 = BitSchedule.load(p)
    assert s2 == s
    np.testing.assert_array_equal(s2.bits_a, s.bits_a)
    assert s2.layer_names == s.layer_names and s2.sampler == s.sampler and s2.quantizer == s.quantizer
    assert BitSchedule.from_dict(s.to_dict()) == s


def test_segments_hand_made():
    s = hand_schedule()
    segs = s.segments()
    assert [(g["start"], g["end"]) for g in segs] == [(0, 2), (2, 5), (5, 6)]
    assert segs[1]["timesteps"] == TIMESTEPS[2:5]
    assert segs[0]["bits_w"] == A and segs[1]["bits_w"] == B and segs[2]["bits_a"] == A[::-1]
    # a change in activations alone also splits a segment
    bw = np.array([A] * 6)
    ba = bw.copy()
    ba[3, 1] = 4
    s2 = BitSchedule.for_denoiser(fake_den(), fake_sampler(), bw, ba)
    assert [(g["start"], g["end"]) for g in s2.segments()] == [(0, 3), (3, 4), (4, 6)]
    assert len(BitSchedule.uniform(fake_den(), fake_sampler(), 8).segments()) == 1


def test_bits_outside_choice_set_named():
    rows = np.array([A] * 6)
    rows[4, 2] = 7
    with pytest.raises(ScheduleError) as e:
        BitSchedule.for_denoiser(fake_den(), fake_sampler(), rows, bit_choices=(2, 3, 4, 5, 6, 8, 16, 32))
    msg = str(e.value)
    assert "bits_w[4, 2] = 7" in msg and "step 4, layer 2" in msg and "up_0/block_1/conv_0" in msg
    assert "(2, 3, 4, 5, 6, 8, 16, 32)" in msg


@pytest.mark.parametrize("bw, ba, match", [
    (np.full((6, 2), 8), np.full((6, 2), 8), "6 x 2; expected T x L = 6 x 3"),             # wrong layer count
    (np.full((5, 3), 8), np.full((5, 3), 8), "5 x 3; expected T x L = 6 x 3"),
    (np.full((6, 3), 8), np.full((6, 3), 4.5), "integers"),          # float bits
])
def test_wrong_shape_or_type(bw, ba, match):
    with pytest.raises(ScheduleError, match=re.escape(match)):
        BitSchedule.for_denoiser(fake_den(), fake_sampler(), bw, ba)


def test_direct_construction_validates():
    s = hand_schedule()
    kw = dict(bits_w=s.bits_w, bits_a=s.bits_a, model_id="m", layer_hash="h", layer_names=s.layer_names,
              sampler=s.sampler)
    BitSchedule(**kw)
    with pytest.raises(ScheduleError, match="bits_a has shape 6 x 2"):
        BitSchedule(**{**kw, "bits_a": s.bits_a[:, :2]})
    with pytest.raises(ScheduleError, match="sampler.steps"):
        BitSchedule(**{**kw, "sampler": {**s.sampler, "steps": 5}})
    with pytest.raises(ScheduleError, match="sampler.timesteps"):
        BitSchedule(**{**kw, "sampler": {**s.sampler, "timesteps": TIMESTEPS[:5]}})
    with pytest.raises(ScheduleError, match="layer_names must be 3"):
        BitSchedule(**{**kw, "layer_names": ("a", "b")})
    with pytest.raises(ScheduleError, match="quantizer.weights: QuantSpec.granularity='row' is not one of"):
        q = {**s.quantizer, "weights": {**s.quantizer["weights"], "granularity": "row"}}
        BitSchedule(**{**kw, "quantizer": q})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        BitSchedule.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "qpolicy-bit-sch')
    with pytest.raises(ScheduleError, match="not valid JSON"):
        BitSchedule.load(bad)
    d = hand_schedule().to_dict()
    cases = [
        ({**d, "format": "something-else"}, "format is 'something-else'"),
        ({**d, "schema_version": 99}, "schema_version is 99"),
        ({k: v for k, v in d.items() if k != "sampler"}, "missing field(s) ['sampler']"),
        ({**d, "bits_W": d["bits_w"]}, "unknown field(s) ['bits_W']"),
        ({**d, "bits_a": d["bits_a"][:4]}, "bits_a has shape 4 x 3"),
        ({**d, "bits_w": [[4, 8], [4, 8, 32]] + d["bits_w"][2:]}, "bits_w must be a T x L integer array"),
        ({**d, "num_layers": 4}, "num_layers=4"),
        ({**d, "segments": d["segments"][:1]}, "segments do not match"),
    ]
    for obj, match in cases:
        f = tmp_path / "case.json"
        f.write_text(json.dumps(obj))
        with pytest.raises(ScheduleError, match=re.escape(match)):
            BitSchedule.load(f)
    # segments are derived: a file without them loads
    f.write_text(json.dumps({k: v for k, v in d.items() if k != "segments"}))
    assert BitSchedule.load(f) == BitSchedule.from_dict(d)


def test_check_compatible_messages(tmp_path):
    s = hand_schedule()
    den = fake_den()
    s.check_compatible(den.name, den.layer_hash, den.layers)
    other = fake_den(name="other")
    with pytest.raises(ScheduleError, match="made for model 'fake3'.*this model is 'other'"):
        s.check_compatible(other.name, other.layer_hash, other.layers)
    renamed = fake_den(paths=("conv_in", "mid/attn/proj", "up_0/block_1/conv_0"))
    with pytest.raises(ScheduleError) as e:
        s.check_compatible(renamed.name, renamed.layer_hash, renamed.layers)
    msg = str(e.value)
    assert s.layer_hash in msg and renamed.layer_hash in msg
    assert "first differing layer: index 1: schedule has 'mid/attn/qkv', model has 'mid/attn/proj'" in msg
    # load_schedule_for refuses the same file for another model and for another sampler
    p = s.save(tmp_path / "s.json")
    assert load_schedule_for(p, den, fake_sampler()) == s
    with pytest.raises(ScheduleError, match="layer-list hash"):
        load_schedule_for(p, renamed, fake_sampler())
    with pytest.raises(ScheduleError, match="T=6 steps"):
        load_schedule_for(p, den, fake_sampler([999, 499, 0]))


def test_read_bits_file_minimal_and_full(tmp_path):
    rows = [A, A, B, B, B, A]
    f = tmp_path / "bits.json"
    f.write_text(json.dumps({"bits_w": rows, "bits_a": rows}))
    bw, ba = read_bits_file(f, T=6, L=3)
    assert bw.shape == (6, 3) and bw.dtype == np.int64 and ba.tolist() == rows
    with pytest.raises(ScheduleError, match=re.escape("bits_w has shape 6 x 3; expected 10 x 3")):
        read_bits_file(f, T=10, L=3)
    with pytest.raises(ScheduleError, match=re.escape("bits_w[2, 0] = 2")):
        read_bits_file(f, bit_choices=(4, 8, 16, 32))
    s = load_schedule_for(f, fake_den(), fake_sampler())
    assert s.model_id == "fake3" and s.bits_w.tolist() == rows and s.provenance["source"] == str(f)
    f.write_text(json.dumps({"bits_w": [[4.0, 8, 8]] * 6, "bits_a": rows}))
    with pytest.raises(ScheduleError, match="integers"):
        read_bits_file(f)
    f.write_text(json.dumps({"bits_w": rows}))
    with pytest.raises(ScheduleError, match=re.escape("missing field(s) ['bits_a']")):
        read_bits_file(f)
    full = hand_schedule().save(tmp_path / "full.json")
    bw, ba = read_bits_file(full, T=6, L=3)
    assert bw.tolist() == rows


# --------------------------------------------------------------------------- #
# JSON Schema
# --------------------------------------------------------------------------- #
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
_KNOWN = {"$schema", "$id", "title", "description", "type", "required", "additionalProperties", "properties",
          "items", "minItems", "minLength", "minimum", "enum", "const", "$ref", "$defs"}


def _mini_validate(inst, schema, root, where="$"):
    """Structural check for the keywords the schema uses (used when jsonschema is not installed)."""
    assert set(schema) <= _KNOWN, f"schema keyword(s) not checked: {set(schema) - _KNOWN}"
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        _mini_validate(inst, target, root, where)
    t = schema.get("type")
    if t == "integer":
        assert isinstance(inst, int) and not isinstance(inst, bool), f"{where}: not an integer"
    elif t == "number":
        assert isinstance(inst, (int, float)) and not isinstance(inst, bool), f"{where}: not a number"
    elif t is not None:
        assert isinstance(inst, _TYPES[t]), f"{where}: not {t}"
    if "const" in schema:
        assert inst == schema["const"], where
    if "enum" in schema:
        assert inst in schema["enum"], where
    if "minimum" in schema:
        assert inst >= schema["minimum"], where
    if "minLength" in schema:
        assert len(inst) >= schema["minLength"], where
    if "minItems" in schema:
        assert len(inst) >= schema["minItems"], where
    if isinstance(inst, dict):
        for k in schema.get("required", ()):
            assert k in inst, f"{where}: missing {k}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in inst.items():
            if k in props:
                _mini_validate(v, props[k], root, f"{where}.{k}")
            elif extra is False:
                raise AssertionError(f"{where}: unexpected key {k}")
            elif isinstance(extra, dict):
                _mini_validate(v, extra, root, f"{where}.{k}")
    if isinstance(inst, list) and "items" in schema:
        for i, v in enumerate(inst):
            _mini_validate(v, schema["items"], root, f"{where}[{i}]")


def test_saved_json_matches_schema(tmp_path):
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"].endswith("2020-12/schema")
    d = json.loads(hand_schedule().save(tmp_path / "s.json").read_text())
    assert set(d) <= set(schema["properties"])  # every saved field is documented
    try:
        import jsonschema
    except ImportError:
        _mini_validate(d, schema, schema)
        with pytest.raises(AssertionError):
            _mini_validate({**d, "schema_version": 2}, schema, schema)
        with pytest.raises(AssertionError):
            _mini_validate({**d, "extra": 1}, schema, schema)
    else:
        jsonschema.Draft202012Validator(schema).validate(d)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(schema).validate({**d, "schema_version": 2})


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #
def test_csv(tmp_path):
    s = hand_schedule()
    (p,) = to_csv(s, tmp_path / "s.csv")
    rows = list(csv.DictReader(p.open()))
    assert len(rows) == s.T * s.L
    r = rows[2 * s.L + 1]  # step 2, layer 1
    assert (r["step"], r["timestep"], r["layer_path"], r["kind"], r["bits_w"]) == ("2", "599", "mid/attn/qkv",
                                                                                   "dense", "16")
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("fmt", SEGMENT_FORMATS)
def test_segment_exporters(tmp_path, fmt):
    s = hand_schedule()
    out = tmp_path / fmt
    paths = export_segments(s, out, fmt)
    n = len(s.segments())
    assert len(paths) == n + 1 and paths[-1].name == "manifest.json"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    man = json.loads(paths[-1].read_text())
    assert man["target"] == fmt and man["switch_steps"] == [2, 5] and man["step_to_segment"] == [0, 0, 1, 1, 1, 2]
    assert [(g["start"], g["end"]) for g in man["segments"]] == [(0, 2), (2, 5), (5, 6)]
    assert man["segments"][1]["timesteps"] == TIMESTEPS[2:5] and "switch configs" in man["how_to_use"]
    assert [g["file"] for g in man["segments"]] == [p.name for p in paths[:-1]]
    seg1 = paths[1]  # segment 1: bits_w = B = [2, 16, 8], bits_a = B reversed = [8, 16, 2]
    if fmt == "modelopt":
        c = json.loads(seg1.read_text())
        q = c["quant_cfg"]
        assert c["algorithm"] == "max" and q[0] == {"quantizer_name": "*", "enable": False}  # first, not last
        by = {e["quantizer_name"]: e["cfg"] for e in q[1:]}
        assert by["conv_in.weight_quantizer"] == {"num_bits": 2, "narrow_range": True, "axis": 0}
        assert by["up_0.block_1.conv_0.input_quantizer"] == {"num_bits": 2, "axis": None}
        q0 = {e["quantizer_name"] for e in json.loads(paths[0].read_text())["quant_cfg"][1:]}
        assert "up_0.block_1.conv_0.weight_quantizer" not in q0 and "conv_in.input_quantizer" not in q0  # 32 bits
    elif fmt == "onnxruntime":
        o = json.loads(seg1.read_text())
        assert o["conv_in.weight"] == [{"quant_type": "QInt8", "symmetric": True, "axis": 0}]  # Conv OIHW
        assert o["mid.attn.qkv.weight"] == [{"quant_type": "QInt16", "symmetric": True, "axis": 1}]  # Gemm (in, out)
        assert o["conv_in.input"] == [{"quant_type": "QUInt8", "symmetric": False}]
        o0 = json.loads(paths[0].read_text())  # conv_in W4/A32 and up conv W32/A4: one float side -> layer float
        assert set(o0) == {"mid.attn.qkv.weight", "mid.attn.qkv.input"}
        assert {"segment": 1, "tensor": "conv_in.weight", "requested_bits": 2, "exported_bits": 8,
                "reason": "onnxruntime QDQ integer types are (8, 16) bits"} in man["rounding"]
        require("onnxruntime")
        from onnxruntime.quantization import QuantType

        from qpolicy.export import read_onnxruntime

        assert read_onnxruntime(seg1)["conv_in.weight"][0]["quant_type"] is QuantType.QInt8
    elif fmt == "qwix":
        rules = json.loads(seg1.read_text())  # W [2, 16, 8], A [8, 16, 2]
        assert rules[0] == {"module_path": "^conv_in$", "weight_qtype": "int8", "act_qtype": "int8"}  # conv: larger
        assert len(rules) == 2 and re.fullmatch(rules[1]["module_path"], "up_0/block_1/conv_0")  # 16-bit -> float
        assert not re.fullmatch(rules[1]["module_path"], "up_0/block_1/conv_0x")
        assert [r["module_path"] for r in json.loads(paths[0].read_text())] == ["^mid/attn/qkv$"]
        assert any("16-bit is not a Qwix qtype" in r["reason"] for r in man["rounding"])


def test_vidit_files_read_back_by_vidit_layout(tmp_path):
    from qpolicy.vidit import read_vidit

    s = hand_schedule()
    paths = export(s, tmp_path / "vq", "vidit")
    assert [p.name for p in paths] == ["weight_mp.yaml", "act_mp.yaml", "remain_fp.txt", "config.yaml",
                                       "manifest.json"]
    w = yaml.safe_load(paths[0].read_text())
    assert list(w) == ["5-4", "3-1", "0-0"]  # inclusive ranges of a count-down step index (T=6)
    assert w["3-1"] == {"conv_in": 2, "mid.attn.qkv": 16, "up_0.block_1.conv_0": 8}
    cfg = yaml.safe_load(paths[3].read_text())
    assert cfg["mixed_precision"] == [2, 4, 8, 16]  # the candidate widths, not per-layer bits
    bw, ba = read_vidit(tmp_path / "vq", [s.alias(l) for l in range(s.L)], s.T)
    np.testing.assert_array_equal(bw, np.where(s.bits_w == 32, 16, s.bits_w))  # 32 inside a quantized layer
    np.testing.assert_array_equal(ba, np.where(s.bits_a == 32, 16, s.bits_a))  # has no ViDiT-Q spelling
    man = json.loads(paths[-1].read_text())
    assert len(man["rounding"]) == 4 and all(r["exported_bits"] == 16 for r in man["rounding"])
    # a layer float everywhere goes to remain_fp.txt and reads back as 32
    s2 = BitSchedule.for_denoiser(fake_den(), fake_sampler(), np.array([[4, 32, 8]] * 6), np.array([[8, 32, 8]] * 6))
    export(s2, tmp_path / "vq2", "vidit")
    assert (tmp_path / "vq2" / "remain_fp.txt").read_text() == "mid.attn.qkv\n"
    bw, ba = read_vidit(tmp_path / "vq2", [s2.alias(l) for l in range(3)], 6)
    np.testing.assert_array_equal(bw, s2.bits_w) and np.testing.assert_array_equal(ba, s2.bits_a)


def test_step_policy_v1_exact_and_v2_schema(tmp_path):
    jsonschema = require("jsonschema")
    from qpolicy.step_policy import fits_first_last_n, nearest_first_last_n, validate

    ba = np.array([[16, 16, 16]] * 2 + [[8, 8, 4]] * 2 + [[16, 16, 16]] * 2)
    s = BitSchedule.for_denoiser(fake_den(), fake_sampler(), np.array([8, 8, 4]), ba)
    assert fits_first_last_n(s) == 2
    (p,) = export(s, tmp_path / "config.json", "step_policy")
    pol = json.loads(p.read_text())["quantization_config"]["runtime"]["diffusion_step_policy"]
    assert pol == {"schema_version": 1, "type": "first_last_n", "n": 2}
    validate(pol)
    h = hand_schedule()
    assert fits_first_last_n(h) is None and nearest_first_last_n(h)[0] in range(4)
    (p2,) = export(h, tmp_path / "v2.json", "step_policy_v2")
    v2 = json.loads(p2.read_text())["quantization_config"]["runtime"]["diffusion_step_policy"]
    validate(v2)
    assert v2["bits"]["weights"] == h.bits_w.tolist() and v2["layers"][1] == "mid.attn.qkv"
    bad = {**v2, "bits": {"weights": v2["bits"]["weights"], "activations": [[8]]}}
    with pytest.raises(ValueError, match="steps x layers"):
        validate(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate({**pol, "type": "per_layer"})


def test_export_dispatch_and_stale_cleanup(tmp_path):
    s = hand_schedule()
    assert export(s, tmp_path / "a.json", "json")[0].name == "a.json"
    assert BitSchedule.load(tmp_path / "a.json") == s
    assert export(s, tmp_path, "csv")[0].name == "bit_schedule.csv"
    with pytest.raises(ValueError, match=re.escape(str(FORMATS))):
        export(s, tmp_path, "tensorrt")
    # re-exporting a schedule with fewer segments removes the old segment files the manifest listed
    out = tmp_path / "q"
    export(s, out, "qwix")
    (out / "notes.txt").write_text("user file")
    with pytest.raises(ValueError, match="writes several files: give a folder"):
        export(s, out / "notes.txt", "modelopt")
    paths = export(BitSchedule.uniform(fake_den(), fake_sampler(), 8, 8), out, "qwix")
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in paths] + ["notes.txt", LOCK_FILE])


# --------------------------------------------------------------------------- #
# the real shipped model
# --------------------------------------------------------------------------- #
def test_real_denoiser_digits16(tmp_path):
    from qpolicy.denoiser import load_denoiser
    from qpolicy.diffusion import make_sampler

    den = load_denoiser("digits16")
    sampler = make_sampler(den.schedule, "ddim", 10)
    L = len(den.layers)
    bw = np.full((10, L), 8)
    bw[5:] = 4
    s = BitSchedule.for_denoiser(den, sampler, bw, 8, provenance={"policy": "two_phase"})
    assert (s.T, s.L) == (10, L) and s.layer_hash == den.layer_hash and s.sampler == sampler.to_dict()
    assert s.layer_aliases["down_0/block_0/conv_0"] == "down_0.block_0.conv_0"
    p = s.save(tmp_path / "digits16.json")
    assert load_schedule_for(p, den, sampler) == s
    with pytest.raises(ScheduleError, match="T=10 steps"):
        load_schedule_for(p, den, make_sampler(den.schedule, "ddim", 20))
    paths = export(s, tmp_path / "mo", "modelopt")
    assert len(paths) == 3
    cfg = {e["quantizer_name"]: e.get("cfg") for e in json.loads(paths[1].read_text())["quant_cfg"]}
    assert cfg["down_0.block_0.conv_0.weight_quantizer"] == {"num_bits": 4, "narrow_range": True, "axis": 0}
