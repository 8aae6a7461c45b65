"""The denoiser as an ONNX model (via jax2onnx), with a name map from registry layers to ONNX tensors.

:func:`export_onnx` converts ``eps = den(x, t)`` (x: (B, H, W, C) float32, t: (B,) int32, B fixed at export:
jax2onnx cannot keep the batch symbolic through ``jax.image.resize``) with jax2onnx, a maintained JAX -> ONNX
converter, then makes the graph addressable by qpolicy's layer names:

* every registry layer's weight initializer is found **by value** (a conv kernel HWIO is the ONNX Conv weight
  OIHW transposed; a dense kernel (in, out) is the Gemm/MatMul B input as stored, or transposed when
  ``transB=1``) and renamed ``<alias>.weight`` (its bias ``<alias>.bias``), the node ``<alias>``;
* every layer gets its own input activation tensor ``<alias>.input`` (an ``Identity`` in front of the node), so
  a tensor feeding several layers (the time embedding feeds every ``temb`` dense) can still be quantized per
  layer.

The name map (:class:`OnnxNameMap`, also written as JSON next to the model) lists per layer: path, alias, ONNX
op, weight / bias / input tensor names, and the weight's per-output-channel axis in the ONNX layout (0 for Conv
OIHW, 1 for a Gemm/MatMul weight stored (in, out)). Layers the converter did not emit as a Conv/Gemm/MatMul with
a constant weight are listed under ``unmapped``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .banks import cache_dir
from .denoiser import Denoiser, weights_hash
from .io import atomic_write_bytes, atomic_write_json, read_json
from .layers import path_tuple

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
INPUT_NAMES = ("x", "t")
OUTPUT_NAME = "eps"
NAME_MAP_FORMAT = "qpolicy-onnx-name-map"


def _require(pkg: str):
    import importlib

    try:
        return importlib.import_module(pkg)
    except ImportError:
        raise ImportError(f"ONNX export needs the '{pkg}' package: pip install 'qpolicy[export]'") from None


@dataclasses.dataclass(frozen=True)
class OnnxNameMap:
    """Registry layer <-> ONNX tensor names of one exported model.

    layers: one dict per registry layer (registry order) with path, alias, index, op ('Conv' / 'Gemm' /
    'MatMul'), node, weight, bias (or None), input (the layer's own input activation tensor), weight_axis (the
    output-channel axis of the ONNX weight). unmapped: registry paths with no matching ONNX node.
    batch: the batch size the model was exported with.
    """

    model_id: str
    layer_hash: str
    batch: int
    layers: tuple[dict, ...]
    unmapped: tuple[str, ...] = ()

    def by_path(self, path: str) -> dict:
        for e in self.layers:
            if e["path"] == path:
                return e
        raise KeyError(f"layer {path!r} is not in the ONNX name map (unmapped: {list(self.unmapped)})")

    def to_dict(self) -> dict:
        return {"format": NAME_MAP_FORMAT, "model_id": self.model_id, "layer_hash": self.layer_hash,
                "batch": self.batch, "inputs": list(INPUT_NAMES), "output": OUTPUT_NAME,
                "layers": list(self.layers), "unmapped": list(self.unmapped)}

    @classmethod
    def from_dict(cls, d: dict) -> "OnnxNameMap":
        if not isinstance(d, dict) or d.get("format") != NAME_MAP_FORMAT:
            raise ValueError(f"not an ONNX name map: field 'format' must be {NAME_MAP_FORMAT!r}")
        return cls(model_id=d["model_id"], layer_hash=d["layer_hash"], batch=int(d["batch"]),
                   layers=tuple(d["layers"]), unmapped=tuple(d["unmapped"]))


def _kernel(den: Denoiser, path: str) -> np.ndarray:
    node = den.params
    for k in path_tuple(path):
        node = node[k]
    return np.asarray(node["kernel"], np.float32)


def _onnx_layouts(kernel: np.ndarray, op: str, trans_b: int) -> tuple[np.ndarray, int] | None:
    """The kernel as the ONNX op stores it, and that layout's output-channel axis (None: not this op)."""
    if op == "Conv" and kernel.ndim >= 3:
        nd = kernel.ndim
        return np.transpose(kernel, (nd - 1, nd - 2, *range(nd - 2))), 0  # HWIO -> OIHW
    if op in ("Gemm", "MatMul") and kernel.ndim == 2:
        return (kernel.T, 0) if trans_b else (kernel, 1)
    return None


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def add_name_map(model: Any, den: Denoiser, batch: int) -> OnnxNameMap:
    """Rename ``model``'s (an onnx.ModelProto, edited in place) layer weights / biases / inputs to qpolicy names
    (see the module docstring) and return the name map."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    values = {}
    for n in g.node:
        if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits and n.input[1] not in values:
            values[n.input[1]] = numpy_helper.to_array(inits[n.input[1]])
    used_nodes: set[int] = set()
    entries, unmapped = [], []
    new_nodes: dict[int, list] = {}
    for lay in den.layers:
        alias = lay.path.replace("/", ".")
        k = _kernel(den, lay.path)
        hit = None
        for j, n in enumerate(g.node):
            if j in used_nodes or n.op_type not in WEIGHT_OPS or n.input[1] not in values:
                continue
            lay_out = _onnx_layouts(k, n.op_type, _attr(n, "transB", 0))
            if lay_out is None:
                continue
            w, axis = lay_out
            v = values[n.input[1]]
            if v.shape == w.shape and np.array_equal(v, w):
                hit = (j, n, axis)
                break
        if hit is None or lay.calls != 1:
            unmapped.append(lay.path)
            continue
        j, n, axis = hit
        used_nodes.add(j)
        names = {"weight": f"{alias}.weight", "input": f"{alias}.input"}
        w_init = inits[n.input[1]]
        w_init.name = names["weight"]
        bias = None
        if len(n.input) > 2 and n.input[2] in inits and sum(n.input[2] in m.input for m in g.node) == 1:
            bias = f"{alias}.bias"
            inits[n.input[2]].name = bias
            n.input[2] = bias
        n.input[1] = names["weight"]
        new_nodes[j] = [onnx.helper.make_node("Identity", [n.input[0]], [names["input"]], name=f"{alias}/input")]
        n.input[0] = names["input"]
        n.name = alias
        entries.append({"index": lay.index, "path": lay.path, "alias": alias, "kind": lay.kind, "op": n.op_type,
                        "node": alias, "weight": names["weight"], "bias": bias, "input": names["input"],
                        "weight_axis": axis, "weight_shape": [int(d) for d in w_init.dims]})
    nodes = []
    for j, n in enumerate(g.node):
        nodes.extend(new_nodes.get(j, []))
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return OnnxNameMap(model_id=den.name, layer_hash=den.layer_hash, batch=batch, layers=tuple(entries),
                       unmapped=tuple(unmapped))


def convert(den: Denoiser, batch: int) -> tuple[Any, OnnxNameMap]:
    """(onnx.ModelProto, OnnxNameMap) of ``eps = den(x, t)`` at a fixed batch size."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int (the ONNX model's fixed batch size), got {batch!r}")
    if den.conditioning is not None:
        raise ValueError(f"model {den.name!r} is class-conditional (classifier-free guidance over two branches); "
                         "ONNX export and the onnxruntime runtime take unconditional denoisers only (export its "
                         "schedules with --format json, csv, modelopt or qwix instead)")
    jax2onnx = _require("jax2onnx")
    _require("onnx")
    params = den.params
    model = jax2onnx.to_onnx(lambda x, t: den.apply(params, x, t),
                             [jax.ShapeDtypeStruct((batch, *den.image_shape), jnp.float32),
                              jax.ShapeDtypeStruct((batch,), jnp.int32)],
                             model_name=den.name, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME])
    return model, add_name_map(model, den, batch)


def export_onnx(den: Denoiser, out: str | os.PathLike, *, batch: int = 16) -> tuple[Path, Path]:
    """Write ``out`` (the FP ONNX model) and ``<out stem>.names.json`` (its :class:`OnnxNameMap`); returns both."""
    model, names = convert(den, batch)
    out = Path(out)
    p = atomic_write_bytes(out, model.SerializeToString())
    m = atomic_write_json(out.with_suffix(".names.json"), names.to_dict())
    return p, m


def cached_onnx(den: Denoiser, batch: int) -> tuple[Path, OnnxNameMap]:
    """The FP ONNX model of ``den`` at ``batch`` from the on-disk cache (exported on first use)."""
    from importlib.metadata import version

    _require("jax2onnx")
    tag = hashlib.sha256(f"{den.layer_hash}|{batch}|{version('jax2onnx')}".encode()).hexdigest()[:10]
    path = cache_dir() / "onnx" / f"{den.name}_{weights_hash(den)}_{tag}_b{batch}.onnx"
    names = path.with_suffix(".names.json")
    if not (path.exists() and names.exists()):
        export_onnx(den, path, batch=batch)
    return path, OnnxNameMap.from_dict(read_json(names, what="ONNX name map"))
