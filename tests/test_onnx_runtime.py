"""ONNX export with a name map (jax2onnx) and the onnxruntime per-segment runtime (`qpolicy deploy onnx`).

The rounding / segmentation rules are plain numpy and run in the default suite; the real-tool tests (jax2onnx,
onnxruntime on the committed digits16 run) are slow and need the ``export`` extra."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from qpolicy.ort_runtime import ort_bits, runtime_segments
from qpolicy.schedule import BitSchedule

ROOT = Path(__file__).resolve().parent.parent
DIGITS_RUN = ROOT / "experiments" / "results" / "cpu" / "digits16_ppo_jax_demo"


def test_ort_bits_rounds_up_to_expressible_types_and_lists_every_change():
    bw = np.array([[2, 8, 16, 32, 4], [6, 8, 16, 32, 32]])
    ba = np.array([[4, 8, 8, 32, 32], [8, 5, 16, 32, 6]])
    w, a, rounding = ort_bits(bw, ba, ["l0", "l1", "l2", "l3", "l4"])
    np.testing.assert_array_equal(w, [[8, 8, 16, 32, 32], [8, 8, 16, 32, 32]])
    np.testing.assert_array_equal(a, [[8, 8, 8, 32, 32], [8, 8, 16, 32, 32]])
    changed = {(r["step"], r["layer"], r["side"]): (r["requested_bits"], r["exported_bits"]) for r in rounding}
    assert changed == {(0, "l0", "weight"): (2, 8), (0, "l0", "activation"): (4, 8), (1, "l0", "weight"): (6, 8),
                       (1, "l1", "activation"): (5, 8), (0, "l4", "weight"): (4, 32), (1, "l4", "activation"): (6, 32)}
    assert next(r for r in rounding if r["layer"] == "l4")["reason"] == "the other side of this layer is float"


def test_runtime_segments_split_at_bit_changes_and_range_buckets():
    bw = np.array([[8, 8]] * 3 + [[16, 8]] * 3)
    segs = runtime_segments(bw, bw, np.array([0, 0, 1, 1, 1, 1]))
    assert segs == [{"start": 0, "end": 2, "bucket": 0}, {"start": 2, "end": 3, "bucket": 1},
                    {"start": 3, "end": 6, "bucket": 1}]


# --------------------------------------------------------------------------- real tools (slow)
@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    require("jax2onnx")
    require("onnxruntime")
    from qpolicy.denoiser import load_denoiser

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QPOLICY_CACHE", str(tmp_path_factory.mktemp("onnx_cache")))
        yield load_denoiser("digits16")


@pytest.fixture(scope="module")
def deployed(digits16, tmp_path_factory):
    from qpolicy.cli import main

    out = tmp_path_factory.mktemp("deploy")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["deploy", "onnx", "--schedule", str(DIGITS_RUN / "learned_mean_schedule.json"), "--n", "32",
                   "--repeats", "1", "--out", str(out), "--json"])
    assert rc == 0
    return json.loads(buf.getvalue()), out


@pytest.mark.slow
def test_fp_onnx_matches_jax_and_names_every_layer(digits16, deployed):
    import jax
    import onnx
    import onnxruntime as ort

    manifest = json.loads((deployed[1] / "manifest.json").read_text())
    path, batch = Path(manifest["fp_model"]), manifest["batch"]  # exported by jax2onnx, then renamed (name map)
    names = json.loads((deployed[1] / manifest["name_map"]).read_text())
    assert names["unmapped"] == [] and [e["path"] for e in names["layers"]] == [l.path for l in digits16.layers]
    model = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for e, lay in zip(names["layers"], digits16.layers):
        node = next(n for n in model.graph.node if n.name == e["node"])
        assert node.input[0] == e["input"] and node.input[1] == e["weight"] and e["weight"] in inits
        assert [n.name for n in consumers[e["input"]]] == [e["node"]]  # every layer owns its input tensor
        out_ch = lay.weight_shape[-1]
        assert inits[e["weight"]][e["weight_axis"]] == out_ch  # the per-channel axis is the output channel
    x = np.asarray(jax.random.normal(jax.random.key(0), (batch, *digits16.image_shape)))
    t = np.resize(np.array([999, 500, 100, 0], np.int32), batch)
    eps = ort.InferenceSession(str(path)).run(None, {"x": x, "t": t})[0]
    ref = np.asarray(jax.jit(digits16.__call__)(x, t))
    np.testing.assert_allclose(eps, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_deploy_onnx_every_segment_applies_the_schedule_types(deployed):
    r, out = deployed
    import onnx

    from qpolicy.onnx_export import OnnxNameMap
    from qpolicy.ort_runtime import applied_bits

    manifest = json.loads((out / "manifest.json").read_text())
    names = OnnxNameMap.from_dict(json.loads((out / manifest["name_map"]).read_text()))
    bw, ba = np.array(manifest["bits_w_executed"]), np.array(manifest["bits_a_executed"])
    s = BitSchedule.load(DIGITS_RUN / "learned_mean_schedule.json")  # the manifest's bits are the schedule's, mapped
    want_w, want_a, _ = ort_bits(s.bits_w, s.bits_a, list(s.layer_names))
    np.testing.assert_array_equal(bw, want_w)
    np.testing.assert_array_equal(ba, want_a)
    assert len(manifest["segments"]) >= 2 and manifest["rounding"]  # the learned schedule has sub-8-bit entries
    for seg in manifest["segments"]:
        got = applied_bits(out / seg["file"], names)  # read back from the QDQ model's own initializers
        for l, e in enumerate(names.layers):
            assert got[e["path"]] == (bw[seg["start"], l], ba[seg["start"], l]), (seg["file"], e["path"])
        onnx.checker.check_model(str(out / seg["file"]))
    assert all(a["layers_matching"] == a["layers"] for a in r["applied"])


@pytest.mark.slow
def test_exported_onnxruntime_overrides_quantize_the_fp_model_to_the_schedule_types(digits16, deployed, tmp_path):
    """The user-facing `qpolicy export --format onnxruntime` files (not `deploy onnx`'s own overrides), fed to
    onnxruntime's quantize_static as the manifest's notes say: every segment's QDQ model runs each layer's weight
    and input at the schedule's bits as ORT expresses them (ort_bits), on the axis of the name map. The committed
    run's schedule maps to W8A8 everywhere in ORT (ORT's defaults), so a second schedule of the same model with
    16-bit, float and mixed layers shows that the overrides, not the defaults, set the types."""
    import dataclasses

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from qpolicy.cli import main
    from qpolicy.export import export, read_onnxruntime
    from qpolicy.onnx_export import OnnxNameMap
    from qpolicy.ort_runtime import QUANT_OPS, applied_bits

    dep = json.loads((deployed[1] / "manifest.json").read_text())  # the FP ONNX model and its name map
    names = OnnxNameMap.from_dict(json.loads((deployed[1] / dep["name_map"]).read_text()))
    learned = BitSchedule.load(DIGITS_RUN / "learned_mean_schedule.json")
    assert main(["export", "--run", str(DIGITS_RUN), "--format", "onnxruntime", "--out", str(tmp_path / "run")]) == 0
    bw, ba = np.array(learned.bits_w), np.array(learned.bits_a)
    half = learned.T // 2
    bw[:, 0::3] = ba[:, 0::3] = 16  # 16-bit layers
    bw[:half, 1::3] = ba[:half, 1::3] = 32  # float layers in the first half
    ba[half:, 2::3] = 16  # 8-bit weights with 16-bit inputs in the second half
    mixed = dataclasses.replace(learned, bits_w=bw, bits_a=ba,
                                bit_choices=tuple(sorted(set(learned.bit_choices) | {16, 32})))
    export(mixed, tmp_path / "mixed", "onnxruntime")
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pairs = set()
    for s, folder in ((learned, tmp_path / "run"), (mixed, tmp_path / "mixed")):
        want_w, want_a, _ = ort_bits(s.bits_w, s.bits_a, list(s.layer_names))
        man = json.loads((folder / "manifest.json").read_text())
        assert [(g["start"], g["end"]) for g in man["segments"]] == [(g["start"], g["end"]) for g in s.segments()]
        for seg in man["segments"]:
            overrides = read_onnxruntime(folder / seg["file"])
            for e in names.layers:
                if e["weight"] in overrides:
                    assert overrides[e["weight"]][0]["axis"] == e["weight_axis"], e["path"]
            nodes = sorted(k[:-len(".weight")] for k in overrides if k.endswith(".weight"))  # the layers listed
            feeds = [{"x": rng.standard_normal((dep["batch"], *digits16.image_shape)).astype(np.float32),
                      "t": np.full((dep["batch"],), s.timesteps[i], np.int32)} for i in seg["steps"][:2]]
            q = folder / seg["file"].replace(".json", ".onnx")
            quantize_static(dep["fp_model"], str(q), Reader(feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANT_OPS), nodes_to_quantize=nodes or ["<none>"],
                            per_channel=True, extra_options={"TensorQuantOverrides": overrides})
            got = applied_bits(q, names)
            for l, e in enumerate(names.layers):
                want = (int(want_w[seg["start"], l]), int(want_a[seg["start"], l]))
                assert got[e["path"]] == want, (folder.name, seg["file"], e["path"])
                pairs.add(want)
    assert pairs == {(8, 8), (16, 16), (32, 32), (8, 16)}


@pytest.mark.slow
def test_deploy_onnx_matches_the_simulation(deployed):
    r, _ = deployed
    assert r["fp_onnx_error"] < 1e-8
    assert 0 < r["final_error"] < 0.1
    assert r["final_error_vs_simulation"] <= 0.25 * r["final_error"]
    assert r["seconds_fp_onnx"] > 0 and r["seconds_quantized_onnx"] > 0
