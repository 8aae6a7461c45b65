"""Quantizable-layer discovery and injection for any Flax linen denoiser, without editing it.

One traced forward pass under ``flax.linen.intercept_methods`` finds every layer that does a
weight matmul/convolution: ``nn.Dense``, ``nn.Conv``, ``nn.ConvTranspose``, ``nn.DenseGeneral``
(which attention projections use), ``nn.Einsum``, and any other module that owns a parameter of
rank >= 2 directly and uses it in its own ``__call__`` (kind ``custom``: a user's raw
``dot_general`` / ``einsum`` layer). Registry order (= the action order) is first-call order.

At quantized run time the same interception fake-quantizes each layer's input activation with
its traced bits, and the layer's weights are fake-quantized in the params tree before the call.
Activation-activation matmuls (attention scores, attention x values) stay in float.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KNOWN_KINDS: tuple[tuple[type, str], ...] = (
    (nn.ConvTranspose, "conv_transpose"),
    (nn.Conv, "conv"),
    (nn.DenseGeneral, "dense_general"),
    (nn.Dense, "dense"),
    (nn.Einsum, "einsum"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """One quantizable layer.

    index: position in the registry = column of bits[T, L]. path: module path ("down_0/block_1/conv_0").
    kind: dense | conv | conv_transpose | dense_general | einsum | custom.
    weight_shape: shape of the main weight. weight_names: names of the quantized weights in the
    module's params. params: weight parameter count (biases excluded; they stay float).
    macs: multiply-accumulates per image per forward pass. calls: times the model calls it.
    """

    index: int
    path: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_names: tuple[str, ...]
    params: int
    macs: int
    calls: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, "kind": self.kind, "weight_shape": list(self.weight_shape),
                "params": self.params, "macs": self.macs}


def _kind_of(module: nn.Module) -> str | None:
    for cls, name in KNOWN_KINDS:
        if isinstance(module, cls):
            return name
    return None


def _own_weights(module: nn.Module) -> dict[str, Any]:
    """Parameters of rank >= 2 held directly by ``module`` (not by its children)."""
    own = module.variables.get("params", {})
    return {k: v for k, v in own.items() if not isinstance(v, dict) and getattr(v, "ndim", 0) >= 2}


def _weights_for(module: nn.Module, kind: str | None) -> dict[str, Any]:
    own = _own_weights(module)
    if kind is not None:
        return {"kernel": own["kernel"]} if "kernel" in own else {}
    return own


def _macs(kind: str, module: nn.Module, w: Any, inp: Any, out: Any) -> int:
    """MACs per image (the leading axis of the output is the batch)."""
    out_per_image = int(np.prod(out.shape[1:]))
    w = np.shape(w)
    if kind == "einsum":
        lhs, rhs_out = module.einsum_str.replace(" ", "").split(",")
        rhs, _ = rhs_out.split("->")
        sizes = {c: d for c, d in zip(lhs, np.shape(inp))}
        sizes.update({c: d for c, d in zip(rhs, w)})
        return int(np.prod(list(sizes.values()))) // int(np.shape(inp)[0])
    if kind == "conv_transpose":
        # every input position is multiplied by the whole kernel
        return int(np.prod(np.shape(inp)[1:-1])) * int(np.prod(w))
    if kind == "dense_general":
        feats = module.features if isinstance(module.features, tuple) else (module.features,)
        return out_per_image * int(np.prod(w)) // int(np.prod(feats))
    # dense / conv / custom: every output element contracts kernel.size / out_features inputs
    return out_per_image * int(np.prod(w)) // int(w[-1])


def _is_array(a: Any) -> bool:
    """A floating array of rank >= 1 (integer inputs, e.g. embedding lookups, are not matmul inputs)."""
    return (isinstance(a, (jax.Array, np.ndarray)) and getattr(a, "ndim", 0) >= 1
            and jnp.issubdtype(a.dtype, jnp.floating))


def trace_layers(module: nn.Module, variables: Any, image_shape: Sequence[int]) -> tuple[LayerInfo, ...]:
    """Run one forward pass on one image and return the registry of quantizable layers."""
    found: dict[tuple[str, ...], dict[str, Any]] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name != "__call__" or not args or not _is_array(args[0]):
            return out
        if isinstance(mod, nn.Embed):  # a table lookup, not a matmul
            return out
        kind = _kind_of(mod)
        weights = _weights_for(mod, kind)
        if not weights or not _is_array(out):
            return out
        kind = kind or "custom"
        path = tuple(mod.scope.path)
        main_name = "kernel" if "kernel" in weights else sorted(weights)[0]
        macs = sum(_macs(kind, mod, w, args[0], out) for w in weights.values()) if kind == "custom" else \
            _macs(kind, mod, weights[main_name], args[0], out)
        if path in found:
            found[path]["macs"] += macs
            found[path]["calls"] += 1
        else:
            found[path] = dict(path="/".join(path), kind=kind, weight_shape=tuple(np.shape(weights[main_name])),
                               weight_names=tuple(sorted(weights)),
                               params=int(sum(np.size(w) for w in weights.values())), macs=macs, calls=1)
        return out

    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)

    def run(v):
        with nn.intercept_methods(interceptor):
            return module.apply(v, x, t)

    jax.eval_shape(run, variables)  # shapes only: no FLOPs spent
    if not found:
        raise ValueError("no quantizable layer found: the model calls no Dense/Conv/DenseGeneral/Einsum module "
                         "and no module owns a weight of rank >= 2")
    return tuple(LayerInfo(index=i, **d) for i, d in enumerate(found.values()))


def end_layers(den: Any) -> tuple[int, ...]:
    """Registry indices of the layers at the model's ends: those that read the input image (an input of the image's
    shape, e.g. ``conv_in``) or write an image-shaped output (e.g. ``conv_out``), in registry order. Found by one
    shape-only forward; ``den``: a :class:`qpolicy.denoiser.Denoiser`."""
    index = {path_tuple(l.path): l.index for l in den.layers}
    image = (1, *den.image_shape)
    ends: set[int] = set()

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        i = index.get(tuple(context.module.scope.path)) if context.method_name == "__call__" else None
        if i is not None and args and _is_array(args[0]) and (tuple(args[0].shape) == image
                                                               or (_is_array(out) and tuple(out.shape) == image)):
            ends.add(i)
        return out

    def run(v):
        with nn.intercept_methods(interceptor):
            return den.module.apply(v, jnp.zeros(image, jnp.float32), jnp.zeros((1,), jnp.int32))

    jax.eval_shape(run, den.variables)
    if not ends:
        raise ValueError(f"model {den.name!r}: no registered layer reads or writes an image-shaped tensor {image}, so "
                         "it has no end layers to keep at higher bits")
    return tuple(sorted(ends))


def keep_ends(den: Any, bits: Any, floor: int) -> Any:
    """(S, L) bits with the model's :func:`end_layers` raised to at least ``floor`` bits (a copy): the PTQ
    convention of keeping the first and last layers at 8 bits when the rest of the network runs at fewer."""
    out = np.array(bits, np.int32, copy=True)
    cols = list(end_layers(den))
    out[..., cols] = np.maximum(out[..., cols], int(floor))
    return out


def layer_hash(layers: Sequence[LayerInfo]) -> str:
    """Stable 16-hex-digit hash of (path, kind, weight shape) in registry order."""
    blob = json.dumps([[l.path, l.kind, list(l.weight_shape)] for l in layers]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def path_tuple(path: str) -> tuple[str, ...]:
    """Registry path string -> module scope path tuple ("" is the top-level module: ())."""
    return tuple(path.split("/")) if path else ()


def _get(tree: Any, path: Sequence[str]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def layer_params(params: Any, layer: LayerInfo) -> Any:
    """The params sub-tree of one registered layer (its kernel, bias, ...)."""
    return _get(params, path_tuple(layer.path))


def map_layer_weights(params: Any, layers: Sequence[LayerInfo], fn: Callable[..., Any], *, named: bool = False
                      ) -> Any:
    """Return a copy of the ``params`` collection with every layer weight w replaced by fn(index, w) (or
    fn(index, w, name) with ``named``)."""
    def copy(d):
        return {k: copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}

    params = copy(params)
    for l in layers:
        node = _get(params, path_tuple(l.path))
        for name in l.weight_names:
            node[name] = fn(l.index, node[name], name) if named else fn(l.index, node[name])
    return params


def activation_interceptor(layers: Sequence[LayerInfo], fn: Callable[[int, Any], Any]):
    """An ``intercept_methods`` interceptor that replaces each registered layer's input x by fn(index, x)."""
    index = {path_tuple(l.path): l.index for l in layers}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and args:
            i = index.get(tuple(context.module.scope.path))
            if i is not None and _is_array(args[0]):
                args = (fn(i, args[0]),) + tuple(args[1:])
        return next_fun(*args, **kwargs)

    return interceptor


def total_macs(layers: Sequence[LayerInfo]) -> int:
    return int(sum(l.macs for l in layers))


def format_table(layers: Sequence[LayerInfo]) -> str:
    """A fixed-width table of the registry (index, path, kind, weight shape, params, MACs)."""
    rows = [("#", "path", "kind", "weight", "params", "MACs")]
    rows += [(str(l.index), l.path, l.kind, "x".join(map(str, l.weight_shape)), f"{l.params:,}", f"{l.macs:,}")
             for l in layers]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j in (0, 4, 5) else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    total = f"total: {len(layers)} layers, {sum(l.params for l in layers):,} weights, {total_macs(layers):,} MACs/image"
    return "\n".join(lines + [total])


__all__ = ["LayerInfo", "trace_layers", "end_layers", "keep_ends", "layer_hash", "layer_params", "map_layer_weights", "activation_interceptor",
           "total_macs", "format_table", "KNOWN_KINDS"]
