"""A measured latency table per (layer, b_w, b_a): each registry layer's op timed as XLA runs it, per kernel class.

HAQ-style: instead of BOPs, the cost of layer l at bits (b_w, b_a) is the measured wall time of the kernel a
deployment would run for that pair. XLA has a kernel per operand type, not per bitwidth, so a bit pair maps to a
**kernel class** (:func:`kernel_class`), the wider side deciding:

    b <= 8  -> int8  (int8 operands, int32 accumulation: ``preferred_element_type=int32``; XLA:GPU convs return
                      float32 from cuDNN's int32 accumulator, as in :mod:`qpolicy.fidelity`)
    b <= 16 -> bf16  (bfloat16 operands and result)
    b == 32 -> fp32  (float32 passthrough)
    (b_w, b_a) -> the wider class of the two: W4A8 runs the int8 kernel (XLA has no int4 kernel), W8A16 bf16.

Each layer's op is captured from the model itself (:func:`capture_ops`: one ``eval_shape`` pass at batch B with the
layer's ``lax.conv_general_dilated`` / ``lax.dot_general`` replaced by a recorder through
:func:`qpolicy.fidelity.with_op`), so shapes, strides, padding, dilation and dimension numbers are the layer's own;
a layer called several times counts every call. Layers of other kinds (conv-transpose, einsum, custom) are timed as
their whole module in float32 for every class (``fallback_layers`` in the file). Only the contraction is timed, not
the activation quantize / dequantize around it, nor the network's float ops between layers.

The table (L, C, C) holds seconds per image (the median over ``repeats`` of one jitted call at batch B, the three
classes of a layer interleaved so load drift on a shared machine hits them alike, divided by B), over a choice set.
It is stored as JSON with the model (:func:`default_path`: ``<checkpoint>/latency/<device>.json``, else the cache),
with the device, the jax version, B, the choice set and the layer-list hash, and verified on load
(:func:`load_table`). ``env.cost: latency`` reads it through :meth:`qpolicy.engine.QuantEngine.with_latency`.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .bits import DEFAULT_BIT_CHOICES, check_choices
from .io import atomic_write_json, read_json
from .layers import path_tuple

FORMAT = "qpolicy-latency-table"
VERSION = 1
KERNEL_CLASSES = ("int8", "bf16", "fp32")
CLASS_RULE = ("b <= 8: int8 operands, int32 accumulation; b <= 16: bf16; 32: fp32; a (b_w, b_a) pair runs the wider "
              "class of the two (W4A8 -> int8, W8A16 -> bf16, W16A32 -> fp32)")


def class_of(bits: int) -> int:
    """Index into :data:`KERNEL_CLASSES` of the kernel that runs one operand at ``bits``."""
    return 0 if bits <= 8 else 1 if bits <= 16 else 2


def kernel_class(bits_w: int, bits_a: int) -> str:
    """The kernel class of a (b_w, b_a) pair: the wider side's class (see the module doc)."""
    return KERNEL_CLASSES[max(class_of(bits_w), class_of(bits_a))]


def expand(class_seconds: np.ndarray, bit_choices: Sequence[int]) -> np.ndarray:
    """(L, K) seconds per kernel class -> (L, C, C) seconds per (W choice, A choice) by :func:`kernel_class`."""
    c = np.array([class_of(b) for b in bit_choices])
    return np.asarray(class_seconds, np.float64)[:, np.maximum(c[:, None], c[None, :])]


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One contraction a layer runs per forward: ``op`` "conv" | "dot" (the lax op with ``args`` / ``kwargs`` as the
    module passes them, operands of shapes ``lhs`` (batch B first) and ``rhs``), or "module" (a layer of another
    kind: ``module`` applied to ``variables`` (shapes) and an input of shape ``lhs``)."""

    op: str
    lhs: tuple[int, ...]
    rhs: tuple[int, ...] = ()
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    module: Any = None
    variables: Any = None


def capture_ops(den: Any, batch: int) -> list[list[OpCall]]:
    """The contractions of every registry layer of ``den`` at batch ``batch``: a list of calls per layer (shapes only;
    no FLOPs are spent)."""
    from .fidelity import with_op
    from .layers import _is_array

    index = {path_tuple(l.path): l.index for l in den.layers}
    calls: list[list[OpCall]] = [[] for _ in den.layers]

    def recorder(l: int, name: str):
        def wrap(op):
            def f(lhs, rhs, *a, **k):
                k.pop("preferred_element_type", None)
                calls[l].append(OpCall(op=name, lhs=tuple(lhs.shape), rhs=tuple(rhs.shape), args=a, kwargs=k))
                return op(lhs, rhs, *a, **k)
            return f
        return wrap

    def interceptor(next_fun, args, kwargs, context):
        l = index.get(tuple(context.module.scope.path)) if context.method_name == "__call__" else None
        if l is None or not args or not _is_array(args[0]):
            return next_fun(*args, **kwargs)
        mod = context.module
        if isinstance(mod, (nn.Conv, nn.Dense, nn.DenseGeneral)):
            with_op(mod, recorder(l, "conv" if isinstance(mod, nn.Conv) else "dot")).apply(
                {"params": mod.variables["params"]}, *args, **kwargs)
        else:  # another kind: its whole call, in float
            shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), dict(mod.variables))
            calls[l].append(OpCall(op="module", lhs=tuple(args[0].shape), module=mod.clone(parent=None),
                                   variables=shapes))
        return next_fun(*args, **kwargs)

    x = jnp.zeros((batch, *den.image_shape), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)

    def run(v):
        with nn.intercept_methods(interceptor):
            return den.module.apply(v, x, t)

    jax.eval_shape(run, den.variables)
    return calls


def _operand(rng: np.random.Generator, shape: tuple[int, ...], cls: str) -> jax.Array:
    if cls == "int8":
        return jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8))
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.bfloat16 if cls == "bf16" else jnp.float32)


def _kernel(call: OpCall, cls: str, rng: np.random.Generator) -> tuple[Callable, tuple]:
    """A jitted function and its operands running ``call`` as kernel class ``cls``."""
    from .fidelity import int8_out

    if call.op == "module":  # fallback: the float module for every class
        v = jax.tree.map(lambda s: _operand(rng, s.shape, "fp32"), call.variables)
        return jax.jit(call.module.apply), (v, _operand(rng, call.lhs, "fp32"))
    op = lax.conv_general_dilated if call.op == "conv" else lax.dot_general
    out = int8_out(call.op == "conv") if cls == "int8" else None
    fn = jax.jit(lambda a, b: op(a, b, *call.args, preferred_element_type=out, **call.kwargs))
    return fn, (_operand(rng, call.lhs, cls), _operand(rng, call.rhs, cls))


def _run(fn: Callable, args: tuple) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def measure_layer(calls: Sequence[OpCall], *, batch: int, warmup: int = 2, repeats: int = 7,
                  seed: int = 0) -> np.ndarray:
    """(K,) median seconds per image of one layer (all its calls) per kernel class; the classes are timed in
    interleaved rounds after ``warmup`` untimed calls each (the first compiles)."""
    rng = np.random.default_rng(seed)
    kernels = [[_kernel(c, cls, rng) for c in calls] for cls in KERNEL_CLASSES]
    for ks in kernels:
        for _ in range(warmup):
            for fn, args in ks:
                _run(fn, args)
    times = np.zeros((repeats, len(KERNEL_CLASSES)))
    for r in range(repeats):
        for k, ks in enumerate(kernels):
            times[r, k] = sum(_run(fn, args) for fn, args in ks)
    return np.median(times, axis=0) / batch


def device_info() -> dict[str, Any]:
    """The device the table is measured on: platform, device kind, the host's CPU model and core count."""
    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(), "host_cpu": cpu,
            "host_cores": os.cpu_count()}


def device_slug(kind: str | None = None) -> str:
    """File-name form of a device kind ("cpu", "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    kind = jax.devices()[0].device_kind if kind is None else kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def default_path(checkpoint_dir: str | Path | None, name: str, layer_hash: str, device: str | None = None) -> Path:
    """Where a model's table for ``device`` (default: this process's device) lives: ``<checkpoint>/latency/<device>
    .json`` next to the model's checkpoint, or ``<cache>/latency/<name>_<layer hash>_<device>.json`` for a model
    without one (``wrap_denoiser``)."""
    slug = device_slug(device)
    if checkpoint_dir:
        return Path(checkpoint_dir) / "latency" / f"{slug}.json"
    from .banks import cache_dir

    return cache_dir() / "latency" / f"{name}_{layer_hash}_{slug}.json"


def model_path(den: Any, device: str | None = None) -> Path:
    """:func:`default_path` of a :class:`~qpolicy.denoiser.Denoiser`."""
    return default_path(den.metadata.get("checkpoint_dir"), den.name, den.layer_hash, device)


def measure(den: Any, *, batch: int = 64, bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES, warmup: int = 2,
            repeats: int = 7, progress: bool = False) -> dict[str, Any]:
    """Measure ``den``'s latency table on this process's default device; returns the JSON record (see
    :func:`save_table`): ``table`` (L, C, C) and ``class_seconds`` (L, K) in seconds per image."""
    from .config import check

    batch = check("batch", batch, kind="int", lo=1)
    repeats = check("repeats", repeats, kind="int", lo=1)
    warmup = check("warmup", warmup, kind="int", lo=1)
    bit_choices = check_choices(bit_choices)
    if 32 not in bit_choices:
        raise ValueError(f"bit_choices must include 32 (the FP32 reference a table is relative to), got {bit_choices}")
    calls = capture_ops(den, batch)
    it = range(len(den.layers))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="latency", unit="layer")
    sec = np.stack([measure_layer(calls[l], batch=batch, warmup=warmup, repeats=repeats, seed=l) for l in it])
    fallback = [den.layers[l].path for l in range(len(den.layers)) if any(c.op == "module" for c in calls[l])]
    return {"format": FORMAT, "version": VERSION, "model": den.name, "layer_hash": den.layer_hash,
            "layers": [l.path for l in den.layers], "bit_choices": list(bit_choices),
            "kernel_classes": list(KERNEL_CLASSES), "class_rule": CLASS_RULE, "units": "seconds per image",
            "batch": batch, "warmup": warmup, "repeats": repeats, "device": device_info(),
            "jax_version": jax.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fallback_layers": fallback, "class_seconds": sec.tolist(), "table": expand(sec, bit_choices).tolist()}


def save_table(record: dict[str, Any], path: str | Path) -> Path:
    """Write a table record atomically (temp file + rename)."""
    return atomic_write_json(path, record)


def load_table(path: str | Path, *, layer_hash: str, num_layers: int | None, bit_choices: Sequence[int]
               ) -> np.ndarray:
    """The (L, C, C) seconds-per-image table of ``path`` for ``bit_choices`` (a subset of the file's choice set:
    an entry depends only on its own bit pair), verified against the model (layer-list hash, L; ``num_layers``
    None: the length of the file's ``layers``, which the hash covers) and the file's own fields. Errors name the
    file and the field."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"latency table {p} not found: measure it with `qpolicy latency --model MODEL --out "
                                f"{p}` (or set env.latency_table to an existing file)")
    rec = read_json(p, what="latency table")

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"latency table {p}: field {field!r} {why}")

    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise bad("format", f"is {rec.get('format') if isinstance(rec, dict) else None!r}, expected {FORMAT!r}")
    if rec.get("version") != VERSION:
        raise bad("version", f"is {rec.get('version')!r}, this qpolicy reads version {VERSION}")
    if rec.get("layer_hash") != layer_hash:
        raise bad("layer_hash", f"is {rec.get('layer_hash')!r}, the model's layer list hashes to {layer_hash!r} "
                                "(measured for another model or model version: re-measure with `qpolicy latency`)")
    try:
        file_choices = check_choices(rec.get("bit_choices"), field="bit_choices")
    except ValueError as e:
        raise bad("bit_choices", str(e)) from None
    missing = sorted(set(int(b) for b in bit_choices) - set(file_choices))
    if missing:
        raise bad("bit_choices", f"is {list(file_choices)}, which lacks bits {missing} of the choice set "
                                 f"{list(bit_choices)}: measure with `qpolicy latency --bit-choices ...`")
    C = len(file_choices)
    if num_layers is None:
        num_layers = len(rec.get("layers") or [])
    try:
        tab = np.asarray(rec.get("table"), np.float64)
    except (TypeError, ValueError):
        raise bad("table", "is not a numeric (L, C, C) array") from None
    if tab.shape != (num_layers, C, C):
        raise bad("table", f"has shape {tab.shape}, expected (L, C, C) = {(num_layers, C, C)}")
    if not np.isfinite(tab).all() or (tab <= 0).any():
        raise bad("table", "must hold finite positive seconds per image")
    pos = [file_choices.index(int(b)) for b in bit_choices]
    return tab[np.ix_(range(num_layers), pos, pos)]


def load_for(den: Any, bit_choices: Sequence[int], path: str | Path | None = None) -> np.ndarray:
    """The verified (L, C, C) table of ``den`` for ``bit_choices``: from ``path``, else :func:`model_path`."""
    return load_table(path if path is not None else model_path(den), layer_hash=den.layer_hash,
                      num_layers=len(den.layers), bit_choices=bit_choices)


def compare(table: np.ndarray, cost_model: Any, pairs: Sequence[tuple[int, int]] = ((4, 8), (8, 8), (16, 16))
            ) -> dict[str, Any]:
    """How far BOPs and measured latency disagree, both relative to their FP32 model: Spearman rank correlation over
    every (layer, W choice, A choice) entry, within each layer over its bit pairs (mean of the layers' correlations;
    the scale of a layer left out), and over layers at FP32; and the relative cost of uniform pairs under each.
    ``table``: (L, C, C) seconds per image on ``cost_model.bit_choices``."""
    from scipy.stats import spearmanr

    from .cost import CostModel

    bops = CostModel(macs=cost_model.macs, params=cost_model.params, bit_choices=cost_model.bit_choices).table()
    lat = CostModel(macs=cost_model.macs, params=cost_model.params, bit_choices=cost_model.bit_choices,
                    latency=table).table()
    L, C = lat.shape[:2]
    within = [spearmanr(bops[l].ravel(), lat[l].ravel())[0] for l in range(L)]
    within = [float(r) for r in within if np.isfinite(r)]
    ch = list(cost_model.bit_choices)
    uniform = {}
    for bw, ba in pairs:
        if bw in ch and ba in ch:
            i, j = ch.index(bw), ch.index(ba)
            b, t = float(bops[:, i, j].sum()), float(lat[:, i, j].sum())
            uniform[f"W{bw}A{ba}"] = {"bops_rel_fp32": b, "latency_rel_fp32": t, "latency_over_bops": t / b}
    return {"spearman_entries": float(spearmanr(bops.ravel(), lat.ravel())[0]),
            "spearman_within_layer_mean": float(np.mean(within)) if within else None,
            "spearman_layers_fp32": float(spearmanr(bops[:, -1, -1], lat[:, -1, -1])[0]) if L > 1 else None,
            "entries": int(L * C * C), "uniform": uniform}


__all__ = ["CLASS_RULE", "KERNEL_CLASSES", "OpCall", "capture_ops", "class_of", "compare", "default_path",
           "device_info", "device_slug", "expand", "kernel_class", "load_for", "load_table", "measure",
           "measure_layer", "model_path", "save_table"]
