"""Conditional denoisers: class labels, classifier-free guidance, and per-image requests drawn from image keys.

A conditional denoiser's module is called ``module.apply(variables, x, t, y)`` with ``y`` (B,) int32 class labels,
``y == num_classes`` meaning "no label" (the unconditional branch, learned by label dropout in training).
Sampling uses classifier-free guidance (Ho & Salimans 2022): ``eps = eps_u + s · (eps_c − eps_u)``, both branches in
one batch of 2B (so a quantized step quantizes both with the same bits, and per-image activation ranges stay per
image and branch).

What a deployed sampler is asked for — the label and the guidance scale s of each image — is a *request*. Like its
noise, an image's request is a deterministic function of its key (:func:`requests`), so the FP reference and every
quantized run of an image agree on it, banks stay plain key ranges, and nothing else in the pipeline changes. Labels
are uniform over the classes; scales are uniform over ``guidance_scales``. The request is deployable information:
the env's observation includes it (:func:`request_features`), never anything of the FP reference.

Cost: BOPs and latency are counted per forward pass; guided sampling runs two passes per step for every schedule,
so costs relative to the FP32 sampler are unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

#: fold_in tags of an image key's request streams (far from the noise streams 0..S of qpolicy.diffusion.image_noise)
LABEL_STREAM = 1_000_003
SCALE_STREAM = 1_000_033
DEFAULT_GUIDANCE_SCALES = (1.0, 2.0, 3.0, 5.0)


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """A class-conditional denoiser's request space.

    num_classes: K labels 0..K-1; label K is the null (unconditional) label.
    guidance_scales: the classifier-free guidance scales s a request draws from (s = 1: the conditional eps alone).
    label_names: optional names of the labels (K of them).
    """

    num_classes: int
    guidance_scales: tuple[float, ...] = DEFAULT_GUIDANCE_SCALES
    label_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, (int, np.integer)) or isinstance(self.num_classes, bool) \
                or self.num_classes < 2:
            raise ValueError(f"conditioning.num_classes must be an int >= 2, got {self.num_classes!r}")
        scales = tuple(float(s) for s in self.guidance_scales) if isinstance(self.guidance_scales, (list, tuple)) \
            else None
        if not scales or any(not np.isfinite(s) or s < 0 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"conditioning.guidance_scales must be a non-empty list of distinct finite scales >= 0, "
                             f"got {self.guidance_scales!r}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "guidance_scales", tuple(sorted(scales)))
        if self.label_names is not None:
            names = tuple(str(n) for n in self.label_names)
            if len(names) != self.num_classes:
                raise ValueError(f"conditioning.label_names must name all {self.num_classes} labels, got {len(names)}")
            object.__setattr__(self, "label_names", names)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def num_features(self) -> int:
        """Entries of :func:`request_features`: the label one-hot (K) and the scale."""
        return self.num_classes + 1

    def feature_names(self) -> list[str]:
        return [f"label[{k}]" for k in range(self.num_classes)] + ["guidance"]

    def to_dict(self) -> dict[str, Any]:
        d = {"num_classes": self.num_classes, "guidance_scales": list(self.guidance_scales)}
        if self.label_names is not None:
            d["label_names"] = list(self.label_names)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "conditioning") -> "Conditioning":
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object with num_classes and guidance_scales, got {d!r}")
        unknown = set(d) - {"num_classes", "guidance_scales", "label_names"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}; accepted: num_classes, guidance_scales, "
                             "label_names")
        if "num_classes" not in d:
            raise ValueError(f"{where} lacks field 'num_classes'")
        names = d.get("label_names")
        try:
            return cls(num_classes=d["num_classes"], guidance_scales=d.get("guidance_scales",
                                                                          DEFAULT_GUIDANCE_SCALES),
                       label_names=tuple(names) if isinstance(names, (list, tuple)) else names)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None


def requests(cond: Conditioning, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(labels (B,) int32, guidance scales (B,) float32) of the images with keys ``keys`` (B,)."""
    scales = jnp.asarray(cond.guidance_scales, jnp.float32)

    def one(k):
        y = jax.random.randint(jax.random.fold_in(k, LABEL_STREAM), (), 0, cond.num_classes, jnp.int32)
        s = scales[jax.random.randint(jax.random.fold_in(k, SCALE_STREAM), (), 0, scales.shape[0], jnp.int32)]
        return y, s

    return jax.vmap(one)(keys)


def request_features(cond: Conditioning, keys: jax.Array) -> jax.Array:
    """(K + 1,) observation block of an env's B images: the label one-hot and s / max(s), averaged over the images."""
    y, s = requests(cond, keys)
    onehot = jax.nn.one_hot(y, cond.num_classes, dtype=jnp.float32)
    return jnp.concatenate([onehot.mean(0), (s / max(cond.guidance_scales[-1], 1e-12)).mean()[None]])


def guided_eps(apply: Callable[..., jax.Array], cond: Conditioning, x: jax.Array, t: jax.Array, keys: jax.Array
               ) -> jax.Array:
    """Classifier-free guided eps of images with keys ``keys``: ``apply(x2, t2, y2)`` is the module call on the
    doubled batch (conditional half first, then the unconditional half)."""
    if keys is None:
        raise ValueError("a conditional denoiser needs the images' keys (their requests: label and guidance scale); "
                         "call den.apply(params, x, t, keys)")
    y, s = requests(cond, keys)
    b = x.shape[0]
    e = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
              jnp.concatenate([y, jnp.full((b,), cond.null_label, jnp.int32)]))
    ec, eu = e[:b], e[b:]
    return eu + s.reshape(-1, *([1] * (x.ndim - 1))) * (ec - eu)


def request_table(cond: Conditioning, keys: jax.Array) -> dict[str, np.ndarray]:
    """Labels and scales of a bank's images as NumPy arrays (reports break errors down by request)."""
    y, s = requests(cond, keys)
    return {"label": np.asarray(y), "guidance": np.asarray(s)}


def check_labels(labels: Sequence[int] | np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """A dataset's labels as int32, every one in 0..num_classes-1 (conditional training needs them all)."""
    y = np.asarray(labels)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{source}: conditional training needs a label in 0..{num_classes - 1} for every image; "
                         f"found labels in {int(y.min())}..{int(y.max())}")
    return y.astype(np.int32)
