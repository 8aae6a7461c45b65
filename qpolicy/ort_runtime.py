"""A per-step schedule executed by onnxruntime: one QDQ model per runtime segment, switched at step boundaries.

How a :class:`~qpolicy.schedule.BitSchedule` becomes onnxruntime models:

1. **Bits ORT can express** (:func:`ort_bits`): integer widths 8 and 16 (QDQ ``QInt8``/``QUInt8``,
   ``QInt16``/``QUInt16``); every width below 8 is rounded up to 8, 9..16 to 16; 32 stays float. A layer is
   quantized on both sides or not at all, so a layer with one 32-bit side keeps the other side in float too.
   Every changed entry is listed (``rounding``).
2. **Runtime segments**: maximal runs of steps with the same rounded bits *and* the same static activation-range
   bucket (ranges are calibrated per step bucket, as qpolicy's static ranges are).
3. **One QDQ model per runtime segment** from ``onnxruntime.quantization.quantize_static`` on the FP ONNX model
   (:mod:`qpolicy.onnx_export`): ``TensorQuantOverrides`` keyed by the name map give each weight its type
   (``QuantType`` enum), symmetric, per output channel on the op's own axis (0 for Conv OIHW, 1 for a Gemm weight
   stored (in, out)), and each layer input its type with the scale / zero point qpolicy computes from its static
   range for that bucket (so ORT and the simulation share activation ranges exactly). The calibration data
   reader feeds the engine's own FP trajectory inputs at the segment's steps.
4. The sampler (qpolicy's ``sampler_step``, same noise) calls the segment's session at each step.

The simulation it is compared with (:func:`simulation_engine`) is qpolicy's engine with what ORT does: the
``plain`` preset (no clipping search, bias correction or shortcut splitting, which ORT's quantizer has no notion
of), static activation ranges, and the rounded bits.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .denoiser import Denoiser
from .diffusion import image_keys, sampler_step
from .engine import QuantEngine, make_engine, quant_config, relative_error
from .io import atomic_write_json
from .onnx_export import OnnxNameMap, _require, cached_onnx
from .quant import compute_scale
from .schedule import BitSchedule, ScheduleError, equal_runs

FP_BITS = 32
ORT_INT_BITS = (8, 16)
QUANT_OPS = ["Conv", "Gemm", "MatMul"]  # the ops whose inputs (weight, activation) are quantized; outputs stay float
MANIFEST_NAME = "manifest.json"
DEPLOY_SEED = 2000  # the eval bank's noise stream: never used to fit or calibrate


def ort_bits(bits_w: np.ndarray, bits_a: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray, list]:
    """(bits_w, bits_a, rounding): the (T, L) bits onnxruntime runs and the list of changed entries
    ``{"step", "layer", "side", "requested_bits", "exported_bits", "reason"}`` (rule: module docstring)."""
    def up(b):
        return np.where(b >= FP_BITS, FP_BITS, np.where(b <= 8, 8, 16))

    bw, ba = up(np.asarray(bits_w)), up(np.asarray(bits_a))
    one_float = (bw == FP_BITS) != (ba == FP_BITS)
    bw, ba = np.where(one_float, FP_BITS, bw), np.where(one_float, FP_BITS, ba)
    rounding = []
    for side, req, got in (("weight", bits_w, bw), ("activation", bits_a, ba)):
        for i, l in zip(*np.nonzero(np.asarray(req) != got)):
            r, g = int(req[i, l]), int(got[i, l])
            rounding.append({"step": int(i), "layer": names[l], "side": side, "requested_bits": r,
                             "exported_bits": g, "reason": "the other side of this layer is float" if
                             g == FP_BITS else f"onnxruntime QDQ integer types are {ORT_INT_BITS} bits"})
    return bw, ba, rounding


def _check_quantizer(schedule: BitSchedule) -> None:
    q = schedule.quantizer
    w, a = q["weights"], q["activations"]
    if w["family"] != "uniform" or not w["symmetric"] or w["granularity"] not in ("channel", "tensor"):
        raise ScheduleError(f"quantizer.weights {w} cannot run in onnxruntime QDQ; accepted: uniform, symmetric, "
                            "granularity 'channel' or 'tensor'")
    if a["family"] != "uniform" or a["granularity"] != "tensor":
        raise ScheduleError(f"quantizer.activations {a} cannot run in onnxruntime QDQ; accepted: uniform, "
                            "granularity 'tensor'")


def simulation_engine(den: Denoiser, schedule: BitSchedule, calib_n: int = 32) -> QuantEngine:
    """qpolicy's engine as onnxruntime executes the schedule: plain preset, static ranges, the schedule's sampler
    and quantizer specs."""
    from .schedule import quant_spec_from

    s = schedule.sampler
    qcfg = quant_config("plain", act_ranges="static", w_spec=quant_spec_from(schedule.quantizer["weights"]),
                        a_spec=quant_spec_from(schedule.quantizer["activations"], "quantizer.activations"),
                        bit_choices=tuple(sorted(set(schedule.bit_choices) | {8, 16, 32})), calib_n=calib_n)
    eng = make_engine(den, steps=s["steps"], sampler=s["kind"], eta=float(s.get("eta", 0.0)), qcfg=qcfg)
    schedule.check_sampler(eng.sampler)
    return eng


def runtime_segments(bw: np.ndarray, ba: np.ndarray, buckets: np.ndarray) -> list[dict]:
    """Maximal runs of steps with equal (bits_w, bits_a) rows and equal range bucket: [{start, end, bucket}]."""
    return [{"start": a, "end": b, "bucket": int(buckets[a])} for a, b in equal_runs(bw, ba, np.asarray(buckets))]


def tensor_overrides(names: OnnxNameMap, bw: np.ndarray, ba: np.ndarray, ranges: np.ndarray,
                     eng: QuantEngine) -> dict[str, list[dict]]:
    """onnxruntime ``TensorQuantOverrides`` for one segment: bw, ba (L,) rounded bits, ranges (L, 2) the static
    activation (min, max) of the segment's bucket. Weights: QInt8/QInt16 symmetric, per channel on the name map's
    axis (per tensor when the spec is); inputs: QUInt8/QUInt16 (QInt for a symmetric spec) with qpolicy's scale
    and zero point."""
    from onnxruntime.quantization import QuantType

    wq = {8: QuantType.QInt8, 16: QuantType.QInt16}
    aq = {8: QuantType.QUInt8, 16: QuantType.QUInt16} if not eng.qcfg.a_spec.symmetric else wq
    adt = {QuantType.QUInt8: np.uint8, QuantType.QUInt16: np.uint16, QuantType.QInt8: np.int8,
           QuantType.QInt16: np.int16}
    out = {}
    for e in names.layers:
        l = e["index"]
        if bw[l] == FP_BITS:
            continue
        w = {"quant_type": wq[int(bw[l])], "symmetric": True}
        if eng.qcfg.w_spec.granularity == "channel":
            w["axis"] = e["weight_axis"]
        out[e["weight"]] = [w]
        lo, hi = ranges[l]
        kw = {"absmax": jnp.maximum(-lo, hi)} if eng.qcfg.a_spec.symmetric else {"minmax": (lo, hi)}
        scale, zp = compute_scale(jnp.zeros(()), int(ba[l]), eng.qcfg.a_spec, **kw)
        qt = aq[int(ba[l])]
        out[e["input"]] = [{"quant_type": qt, "scale": np.array(scale, np.float32), "zero_point": np.array(int(zp), adt[qt])}]
    return out


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def quantize_segment(fp_path: Path, names: OnnxNameMap, overrides: dict, feeds: list[dict], out: Path) -> Path:
    """A QDQ model of the FP ONNX model with ``overrides`` (layers without an override stay float)."""
    _require("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    nodes = [e["node"] for e in names.layers if e["weight"] in overrides]
    quantize_static(str(fp_path), str(out), Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANT_OPS), nodes_to_quantize=nodes or ["<none>"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"TensorQuantOverrides": overrides, "WeightSymmetric": True,
                                   "ActivationSymmetric": False, "QDQDisableWeightAdjustForInt32Bias": True,
                                   "OpTypesToExcludeOutputQuantization": QUANT_OPS, "QuantizeBias": False})
    return out


_ONNX_BITS = {"INT8": 8, "UINT8": 8, "INT16": 16, "UINT16": 16, "INT4": 4, "UINT4": 4}


def applied_bits(qdq_path: Path, names: OnnxNameMap) -> dict[str, tuple[int, int]]:
    """{layer path: (weight bits, input bits)} as the QDQ model holds them (32 = no DequantizeLinear in front)."""
    import onnx

    m = onnx.load(str(qdq_path))
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    node_by_name = {n.name: n for n in g.node}

    def bits_of(tensor: str) -> int:
        dq = prod.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return FP_BITS
        src = dq.input[0]
        if src in inits:
            return _ONNX_BITS[onnx.TensorProto.DataType.Name(inits[src].data_type)]
        q = prod.get(src)  # activation: QuantizeLinear -> DequantizeLinear; its zero point carries the type
        zp = q.input[2] if q is not None and len(q.input) > 2 else None
        return _ONNX_BITS[onnx.TensorProto.DataType.Name(inits[zp].data_type)] if zp in inits else FP_BITS

    out = {}
    for e in names.layers:
        n = node_by_name.get(e["node"])
        if n is None:  # the quantizer may rename a node it rewrote; find it by its weight consumer
            n = next(x for x in g.node if x.op_type == e["op"] and any(i.startswith(e["weight"]) for i in x.input))
        out[e["path"]] = (bits_of(n.input[1]), bits_of(n.input[0]))
    return out


@dataclasses.dataclass
class OrtDeployment:
    """Sessions and plan of a schedule in onnxruntime (see :func:`build`)."""

    schedule: BitSchedule
    engine: QuantEngine
    names: OnnxNameMap
    fp_path: Path
    bits_w: np.ndarray
    bits_a: np.ndarray
    rounding: list
    segments: list[dict]
    model_paths: list[Path]
    applied: list[dict]
    build_seconds: float


def build(den: Denoiser, schedule: BitSchedule, out_dir: str | Path, *, batch: int, calib_n: int = 32
          ) -> OrtDeployment:
    """Export the FP ONNX model (cached) and one QDQ model per runtime segment into ``out_dir``."""
    t0 = time.perf_counter()
    _check_quantizer(schedule)
    schedule.check_compatible(den.name, den.layer_hash, [l.path for l in den.layers])
    eng = simulation_engine(den, schedule, calib_n)
    fp_path, names = cached_onnx(den, batch)
    if names.unmapped:
        raise ValueError(f"layers {list(names.unmapped)} have no Conv/Gemm/MatMul node with their weight in the ONNX "
                         "model; onnxruntime cannot quantize them by name")
    bw, ba, rounding = ort_bits(schedule.bits_w, schedule.bits_a, list(schedule.layer_names))
    buckets = np.asarray(eng.bucket(np.arange(schedule.T)))
    segs = runtime_segments(bw, ba, buckets)
    table = np.asarray(eng.act_ranges_table)
    # calibration feeds: the engine's own FP trajectory inputs (calibration noise stream) at the segment's steps
    keys = image_keys(3000, batch)
    fp = np.asarray(jax.jit(eng.fp_trajectory)(keys))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, applied = [], []
    for k, seg in enumerate(segs):
        ov = tensor_overrides(names, bw[seg["start"]], ba[seg["start"]], table[seg["bucket"]], eng)
        feeds = [{"x": fp[i], "t": np.full((batch,), schedule.timesteps[i], np.int32)}
                 for i in range(seg["start"], seg["end"])]
        p = quantize_segment(fp_path, names, ov, feeds, out_dir / f"segment_{k:03d}_steps_{seg['start']:04d}-"
                                                                 f"{seg['end'] - 1:04d}.onnx")
        paths.append(p)
        got = applied_bits(p, names)
        want = {path: (int(bw[seg["start"], l]), int(ba[seg["start"], l])) for l, path in
                enumerate(schedule.layer_names)}
        applied.append({"segment": k, "layers_matching": sum(got[p_] == want[p_] for p_ in want),
                        "layers": len(want), "mismatched": {p_: {"want": want[p_], "got": got[p_]} for p_ in want
                                                             if got[p_] != want[p_]}})
    names_path = atomic_write_json(out_dir / "onnx_names.json", names.to_dict())
    atomic_write_json(out_dir / MANIFEST_NAME, {
        "format": "qpolicy-ort-manifest", "model_id": schedule.model_id, "layer_hash": schedule.layer_hash,
        "sampler": schedule.sampler, "batch": batch, "fp_model": str(fp_path), "name_map": names_path.name,
        "how_to_use": "before sampler step i, run the model of the segment with start <= i < end (end exclusive); "
                      "inputs x (B, H, W, C) float32 and t (B,) int32, output eps",
        "simulation": {"preset": "plain", "act_ranges": "static", "range_buckets": eng.qcfg.range_buckets,
                       "calib_n": calib_n},
        "segments": [{**sg, "file": p.name} for sg, p in zip(segs, paths)],
        "applied": applied, "rounding": rounding,
        "bits_w_executed": bw.tolist(), "bits_a_executed": ba.tolist()})
    return OrtDeployment(schedule=schedule, engine=eng, names=names, fp_path=fp_path, bits_w=bw, bits_a=ba,
                         rounding=rounding, segments=segs, model_paths=paths, applied=applied,
                         build_seconds=time.perf_counter() - t0)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_sampler(eng: QuantEngine, keys: jax.Array, eps_at) -> tuple[np.ndarray, float]:
    """x_0 (B, H, W, C) of the engine's sampler with eps from ``eps_at(x np, i) -> eps np``; seconds in eps_at."""
    step = jax.jit(lambda x, eps, i: sampler_step(eng.sampler, x, eps, i, keys))
    x = eng.initial(keys)
    spent = 0.0
    for i in range(eng.num_steps):
        xn = np.asarray(x)
        t0 = time.perf_counter()
        eps = eps_at(xn, i)
        spent += time.perf_counter() - t0
        x = step(x, jnp.asarray(eps), i)
    return np.asarray(x), spent


def deploy(den: Denoiser, schedule: BitSchedule, out_dir: str | Path, *, n: int = 16, seed: int = DEPLOY_SEED,
           threads: int = 1, repeats: int = 3, calib_n: int = 32) -> dict[str, Any]:
    """Run ``schedule`` in onnxruntime on ``n`` images (noise stream ``seed``) and compare.

    Returns final_error (ORT vs the JAX FP sampler, same noise), final_error_vs_simulation (ORT vs qpolicy's
    simulation of the rounded schedule with the same ranges), final_error_simulation (simulation vs FP),
    fp_onnx_error (FP ONNX vs JAX FP), seconds (best of ``repeats``, denoiser calls only) for the FP and the
    quantized ORT runs, the runtime segments, the rounding list and the per-segment applied-bits check.
    """
    from .rundir import locked

    with locked(out_dir, what="deploy --out folder"):  # one writer at a time, as run directories
        dep = build(den, schedule, out_dir, batch=n, calib_n=calib_n)
    eng = dep.engine
    keys = image_keys(seed, n)
    ts = schedule.timesteps
    tvec = [np.full((n,), t, np.int32) for t in ts]
    fp_sess = _session(dep.fp_path, threads)
    q_sess = [_session(p, threads) for p in dep.model_paths]
    seg_of = [k for k, s in enumerate(dep.segments) for _ in range(s["start"], s["end"])]
    ref = np.asarray(jax.jit(eng.fp_trajectory)(keys))[-1]
    sim = np.asarray(jax.jit(eng.trajectory)(keys, jnp.asarray(dep.bits_w, jnp.int32),
                                             jnp.asarray(dep.bits_a, jnp.int32)))[-1]
    runs = {}
    for name, pick in (("fp", lambda i: fp_sess), ("quantized", lambda i: q_sess[seg_of[i]])):
        best = None
        for _ in range(repeats):
            x0, sec = _run_sampler(eng, keys, lambda x, i: pick(i).run(None, {"x": x, "t": tvec[i]})[0])
            best = sec if best is None else min(best, sec)
        runs[name] = (x0, best)
    per_image = lambda a, b: np.asarray(relative_error(jnp.asarray(a), jnp.asarray(b)))  # noqa: E731
    err = lambda a, b: float(np.mean(per_image(a, b)))  # noqa: E731
    return {
        "model_id": den.name, "n": n, "seed": seed, "steps": schedule.T, "sampler": schedule.sampler["kind"],
        "final_error": err(runs["quantized"][0], ref),
        "final_error_vs_simulation": err(runs["quantized"][0], sim),
        "final_error_simulation": err(sim, ref),
        "per_image": {"final_error": per_image(runs["quantized"][0], ref).tolist(),
                      "final_error_vs_simulation": per_image(runs["quantized"][0], sim).tolist()},
        "fp_onnx_error": err(runs["fp"][0], ref),
        "seconds_fp_onnx": runs["fp"][1], "seconds_quantized_onnx": runs["quantized"][1],
        "speedup": runs["fp"][1] / runs["quantized"][1], "threads": threads, "repeats": repeats,
        "build_seconds": dep.build_seconds,
        "simulation": {"preset": "plain", "act_ranges": "static", "range_buckets": eng.qcfg.range_buckets,
                       "calib_n": calib_n},
        "segments": [{**s, "model": p.name} for s, p in zip(dep.segments, dep.model_paths)],
        "applied": dep.applied, "rounding": dep.rounding,
        "bits_w_executed": dep.bits_w.tolist(), "bits_a_executed": dep.bits_a.tolist(),
    }
