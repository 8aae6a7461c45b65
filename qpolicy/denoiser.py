"""The ``Denoiser`` object every other part of qpolicy consumes, and checkpoints on disk.

A checkpoint is a folder holding ``meta.json`` (format, model config, dataset, schedule, training
record, layer-list hash) and ``weights.msgpack`` (EMA params, float16 for shipped models, loaded
as float32); ``train_state.msgpack`` (params, EMA, optimizer state, step) is added by training
for resumption. Shipped checkpoints live in ``qpolicy/assets/models/<name>/``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .diffusion import Schedule, schedule_from_dict
from .conditioning import Conditioning, guided_eps
from .io import atomic_write_json, load_pytree, read_json, save_pytree
from .layers import LayerInfo, layer_hash, trace_layers
from .models import UNet, UNetConfig

ASSETS = Path(__file__).parent / "assets"
MODELS_DIR = ASSETS / "models"
FORMAT = "qpolicy-denoiser"
FORMAT_VERSION = 1
DEFAULT_MODEL = "digits16"


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    """A denoiser ready for sampling and quantization.

    module: any linen module with ``module.apply(variables, x (B,H,W,C), t (B,)) -> eps``.
    variables: its variable collections; ``params`` is the one that gets quantized.
    schedule: the forward-process schedule it was trained with. image_shape: (H, W, C).
    name: model id (shipped name or folder name). layers: the quantizable-layer registry.
    metadata: the checkpoint's meta.json contents (or what ``wrap_denoiser`` was told).
    conditioning: a class-conditional model's request space (labels, guidance scales; see qpolicy.conditioning):
        its module is called ``module.apply(variables, x, t, y)`` and sampled with classifier-free guidance, each
        image's request drawn from its key. None: an unconditional model.
    """

    module: nn.Module
    variables: Any
    schedule: Schedule
    image_shape: tuple[int, int, int]
    name: str
    layers: tuple[LayerInfo, ...]
    metadata: dict = dataclasses.field(default_factory=dict)
    conditioning: Conditioning | None = None

    @property
    def params(self) -> Any:
        return self.variables["params"]

    @property
    def layer_hash(self) -> str:
        return layer_hash(self.layers)

    @property
    def dataset(self) -> str | None:
        return self.metadata.get("dataset")

    def apply(self, params: Any, x: jax.Array, t: jax.Array, keys: jax.Array | None = None) -> jax.Array:
        """eps = model(x, t) with ``params`` in place of the stored params collection; a conditional model needs
        the images' keys (B,) (their requests) and returns the classifier-free guided eps."""
        v = {**self.variables, "params": params}
        if self.conditioning is None:
            return self.module.apply(v, x, t)
        return guided_eps(lambda x2, t2, y2: self.module.apply(v, x2, t2, y2), self.conditioning, x, t, keys)

    def __call__(self, x: jax.Array, t: jax.Array, keys: jax.Array | None = None) -> jax.Array:
        return self.apply(self.params, x, t, keys)


def _validate_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape!r}")
    return shape  # type: ignore[return-value]


def wrap_denoiser(module: nn.Module, params: Any, *, image_shape: Sequence[int], schedule: Schedule,
                  name: str = "custom", metadata: dict | None = None,
                  conditioning: Conditioning | None = None) -> Denoiser:
    """Turn a user's own linen module (``module.apply(variables, x, t) -> eps``) into a :class:`Denoiser`.

    ``params`` may be the full variables dict (with a ``params`` key) or the params collection. With
    ``conditioning`` the module is class-conditional: ``module.apply(variables, x, t, y)``, y (B,) int labels, label
    ``conditioning.num_classes`` = unconditional (see qpolicy.conditioning)."""
    if conditioning is not None and not isinstance(conditioning, Conditioning):
        raise TypeError(f"conditioning must be a qpolicy.conditioning.Conditioning, got {type(conditioning).__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a flax.linen.Module, got {type(module).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError("schedule must be a qpolicy.diffusion.Schedule (see qpolicy.make_schedule)")
    variables = dict(params) if "params" in params else {"params": params}
    shape = _validate_image_shape(image_shape)
    x = jnp.zeros((1, *shape), jnp.float32)
    try:
        out = jax.eval_shape(lambda v: module.apply(v, x, jnp.zeros((1,), jnp.int32)), variables)
    except Exception as e:
        raise ValueError(f"module.apply(variables, x {x.shape}, t (1,)) failed for image_shape={shape}: {e}") from e
    if out.shape != x.shape:
        raise ValueError(f"the denoiser must return eps with the input's shape {x.shape}, got {out.shape}")
    layers = trace_layers(module, variables, shape)
    meta = {"name": name, "image_shape": list(shape), "schedule": schedule.to_dict(),
            "layer_hash": layer_hash(layers), **(metadata or {})}
    if conditioning is not None:
        meta["conditioning"] = conditioning.to_dict()
        y = jnp.full((1,), conditioning.null_label, jnp.int32)
        try:
            jax.eval_shape(lambda v: module.apply(v, x, jnp.zeros((1,), jnp.int32), y), variables)
        except Exception as e:
            raise ValueError(f"a conditional module must accept module.apply(variables, x, t, y); it failed: {e}") \
                from e
    return Denoiser(module=module, variables=variables, schedule=schedule, image_shape=shape, name=name,
                    layers=layers, metadata=meta, conditioning=conditioning)


def available_models() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "meta.json").exists()) if MODELS_DIR.exists() else []


def resolve_model_dir(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if str(name_or_path) in available_models():
        return MODELS_DIR / str(name_or_path)
    raise FileNotFoundError(
        f"model {str(name_or_path)!r} is neither a checkpoint folder nor a shipped model; "
        f"shipped models: {available_models()} (train one with `qpolicy denoiser train`)")


def build_unet(meta: dict) -> UNet:
    if meta.get("arch") != "unet":
        raise ValueError(f"checkpoint arch {meta.get('arch')!r} is not supported by load_denoiser; accepted: 'unet' "
                         "(wrap other models with qpolicy.wrap_denoiser)")
    return UNet(UNetConfig.from_dict(meta["model_config"]))


def load_denoiser(name_or_path: str | Path = DEFAULT_MODEL) -> Denoiser:
    """Load a shipped model by name (``digits16``, ``patches32``) or a checkpoint folder."""
    d = resolve_model_dir(name_or_path)
    meta = read_json(d / "meta.json", what="checkpoint metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"{d / 'meta.json'} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / 'meta.json'}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("model_config", "schedule", "image_shape"):
        if key not in meta:
            raise ValueError(f"{d / 'meta.json'} lacks field {key!r}")
    for key in ("model_config", "schedule"):
        if not isinstance(meta[key], dict):
            raise ValueError(f"{d / 'meta.json'}: field {key!r} must be an object, got {meta[key]!r}")
    module = build_unet(meta)
    params = load_pytree(d / "weights.msgpack", what="checkpoint weights")
    bad = [jax.tree_util.keystr(k) for k, a in jax.tree_util.tree_leaves_with_path(params)
           if np.asarray(a).dtype.kind in "fc" and not np.isfinite(np.asarray(a)).all()]
    if bad:
        raise ValueError(f"{d / 'weights.msgpack'} holds NaN or inf in {len(bad)} tensor(s), first {bad[0]}; every "
                         "weight must be finite (retrain or restore the checkpoint)")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    cond = meta.get("conditioning")
    cond = None if cond is None else Conditioning.from_dict(cond, where=f"{d / 'meta.json'}: field 'conditioning'")
    if (cond is not None) != bool(module.cfg.num_classes) or (cond and cond.num_classes != module.cfg.num_classes):
        raise ValueError(f"{d / 'meta.json'}: field 'conditioning' ({None if cond is None else cond.num_classes} "
                         f"classes) does not match model_config.num_classes ({module.cfg.num_classes})")
    den = wrap_denoiser(module, {"params": params}, image_shape=meta["image_shape"],
                        schedule=schedule_from_dict(meta["schedule"]), name=meta.get("name", d.name),
                        metadata={**meta, "checkpoint_dir": str(d.resolve())}, conditioning=cond)
    if meta.get("layer_hash") and meta["layer_hash"] != den.layer_hash:
        raise ValueError(f"{d}: layer-list hash {den.layer_hash} differs from the recorded {meta['layer_hash']}; "
                         "the checkpoint does not match this version of the model code")
    return den


def save_checkpoint(out_dir: str | Path, *, module: UNet, params: Any, schedule: Schedule, dataset: str,
                    image_shape: Sequence[int], train: dict, name: str | None = None,
                    weights_dtype: str = "float32", extra: dict | None = None) -> Path:
    """Write weights.msgpack then meta.json (each atomically) into ``out_dir``."""
    out = Path(out_dir)
    shape = _validate_image_shape(image_shape)
    layers = trace_layers(module, {"params": params}, shape)
    w = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=weights_dtype), params)
    save_pytree(out / "weights.msgpack", w)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "name": name or out.name, "arch": "unet",
            "model_config": module.cfg.to_dict(), "dataset": dataset, "image_shape": list(shape),
            "schedule": schedule.to_dict(), "weights_dtype": weights_dtype,
            "param_count": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params))),
            "layer_hash": layer_hash(layers), "num_layers": len(layers), "train": train, **(extra or {})}
    atomic_write_json(out / "meta.json", meta)
    return out


def generate(den: Denoiser, n: int, *, steps: int = 20, sampler: str = "ddim", eta: float = 0.0, seed: int = 0,
             batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """Draw ``n`` full-precision samples (N, H, W, C) in [-1, 1] from image keys 0..n-1 of ``seed``."""
    from tqdm.auto import tqdm

    from .diffusion import image_keys, make_sampler, sample

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    smp = make_sampler(den.schedule, sampler, steps, eta=eta)
    run = jax.jit(lambda params, keys: sample(lambda x, t, i: den.apply(params, x, t, keys), smp, keys,
                                              den.image_shape))
    keys = image_keys(seed, n)
    out = []
    for s in tqdm(range(0, n, batch_size), desc="sample", disable=not progress):
        kb = keys[s:s + batch_size]
        if kb.shape[0] < batch_size and n > batch_size:  # pad so one compiled shape serves every batch
            kb = jnp.concatenate([kb, keys[: batch_size - kb.shape[0]]])
        out.append(np.asarray(run(den.params, kb))[: min(batch_size, n - s)])
    return np.concatenate(out)[:n]


def weights_hash(den: Denoiser) -> str:
    """A short hash of the denoiser's weights (first 4 kB of each leaf) and, for a conditional model, its requests
    (labels, guidance scales): keys caches by checkpoint."""
    h = hashlib.sha256(b"".join(np.asarray(l).tobytes()[:4096] for l in jax.tree_util.tree_leaves(den.params)))
    if den.conditioning is not None:
        h.update(repr(sorted(den.conditioning.to_dict().items())).encode())
    return h.hexdigest()[:8]
