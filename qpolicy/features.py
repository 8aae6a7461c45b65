"""Feature networks: small CNN classifiers trained on each dataset, whose penultimate features define the
spaces the distribution metrics (:mod:`qpolicy.metrics`) are computed in.

Features come from a small CNN classifier (:class:`FeatureNet`) trained on the
dataset itself, not from Inception: the built-in datasets are tiny greyscale /
low-resolution images for which Inception features are meaningless.  Shipped
networks live in ``qpolicy/assets/features/<dataset>/`` and are created with::

    python -m qpolicy.metrics train digits --steps 2000   (same as python -m qpolicy.features)

Feature spaces:

* ``digits``  - 10-way digit classifier (16x16).
* ``faces``   - face-vs-non-face classifier trained on the 160 training images
  of ``lfw_subset``.  With only 200 images and 2 classes this is a **weak
  feature space**: it separates faces from background well but says little
  about finer image quality.  Treat FD/KID on ``faces`` as a coarse signal.
* ``patches`` - 7-way "which source photo" classifier on 32x32 RGB crops.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.io import atomic_write_json, load_pytree, read_json, save_pytree

__all__ = ["FeatureNet", "FeatureExtractor", "default_config", "feature_module", "train_feature_net",
           "load_feature_extractor", "feature_asset_dir"]

ASSET_ROOT = Path(__file__).resolve().parent / "assets" / "features"
WEIGHTS_FILE = "feature_net.msgpack"
CONFIG_FILE = "feature_net.json"
FORMAT_VERSION = 1


# =========================================================================== network
class FeatureNet(nn.Module):
    """Small CNN classifier: conv blocks (GroupNorm + SiLU, stride-2 downsampling),
    global average pool, Dense(``feature_dim``) "features" layer, Dense(``num_classes``) head.

    ``apply(params, x, features=True)`` returns the penultimate features ``(N, feature_dim)``
    (after the SiLU); ``features=False`` returns logits ``(N, num_classes)``.
    """

    num_classes: int
    channels: Sequence[int] = (32, 64, 128)
    strides: Sequence[int] = (1, 2, 2)
    feature_dim: int = 128
    groups: int = 8

    @nn.compact
    def __call__(self, x, features: bool = False):
        x = jnp.asarray(x, jnp.float32)
        for i, (ch, st) in enumerate(zip(self.channels, self.strides)):
            x = nn.Conv(ch, (3, 3), strides=(st, st), padding="SAME", name=f"conv{i}")(x)
            x = nn.GroupNorm(num_groups=min(self.groups, ch), name=f"norm{i}")(x)
            x = nn.silu(x)
        x = jnp.mean(x, axis=(1, 2))
        f = nn.silu(nn.Dense(self.feature_dim, name="features")(x))
        if features:
            return f
        return nn.Dense(self.num_classes, name="head")(f)


def feature_module(config: dict):
    return FeatureNet(
        num_classes=int(config["num_classes"]),
        channels=tuple(int(c) for c in config["channels"]),
        strides=tuple(int(s) for s in config["strides"]),
        feature_dim=int(config["feature_dim"]),
        groups=int(config["groups"]),
    )


def default_config(num_classes: int) -> dict:
    return {
        "num_classes": int(num_classes),
        "channels": [32, 64, 128],
        "strides": [1, 2, 2],
        "feature_dim": 128,
        "groups": 8,
    }


# =========================================================================== extractor
@dataclasses.dataclass
class FeatureExtractor:
    """A trained :class:`FeatureNet` plus what it was trained on."""

    config: dict
    params: Any
    dataset_name: str
    image_shape: tuple[int, int, int]
    test_accuracy: float | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]
        self._fn = None

    @property
    def module(self):
        return feature_module(self.config)

    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    def _features_fn(self):
        if self._fn is None:

            module = self.module
            self._fn = jax.jit(lambda p, x: module.apply(p, x, features=True))
        return self._fn

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim == 3 and self.image_shape[2] == 1:
            x = x[..., None]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images: expected shape (N, {', '.join(map(str, self.image_shape))}) for the "
                f"{self.dataset_name!r} feature net, got {x.shape}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"images: expected float images in [-1, 1], got dtype {x.dtype}")
        return x.astype(np.float32, copy=False)

    def features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Penultimate features ``(N, feature_dim)`` as float64 for images ``(N, H, W, C)`` in [-1, 1]."""
        x = self._check_images(images)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, self.feature_dim), np.float64)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        fn = self._features_fn()
        chunk = min(int(batch_size), n)
        out = []
        for i in range(0, n, chunk):
            xb = x[i : i + chunk]
            m = xb.shape[0]
            if m < chunk:  # pad so the jitted function compiles once per chunk size
                xb = np.concatenate([xb, np.zeros((chunk - m,) + xb.shape[1:], xb.dtype)])
            out.append(np.asarray(fn(self.params, xb))[:m])
        return np.concatenate(out).astype(np.float64)

    def logits(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:

        x = self._check_images(images)
        module = self.module
        fn = jax.jit(lambda p, xb: module.apply(p, xb))
        return np.concatenate([np.asarray(fn(self.params, x[i : i + batch_size])) for i in range(0, len(x), batch_size)])

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``feature_net.msgpack`` and ``feature_net.json`` into ``directory`` (atomically)."""

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_pytree(directory / WEIGHTS_FILE, self.params)
        n_params = int(sum(np.size(p) for p in jax.tree_util.tree_leaves(self.params)))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "qpolicy.metrics.FeatureNet",
            "dataset_name": self.dataset_name,
            "image_shape": list(self.image_shape),
            "config": self.config,
            "test_accuracy": self.test_accuracy,
            "num_params": n_params,
            "info": self.info,
        }
        atomic_write_json(directory / CONFIG_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "FeatureExtractor":
        """Load from a directory written by :meth:`save`.

        Raises ``FileNotFoundError`` if a file is missing and ``ValueError`` if a file is
        corrupt or the weights do not match the recorded architecture.
        """

        directory = Path(directory)
        cfg_path = directory / CONFIG_FILE
        meta = read_json(cfg_path, what="feature-net config")
        required = ("dataset_name", "image_shape", "config")
        if not isinstance(meta, dict) or any(k not in meta for k in required):
            raise ValueError(f"feature-net config {cfg_path} is malformed: needs keys {list(required)}")
        if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"feature-net config {cfg_path} has format_version {meta['format_version']}; "
                f"this qpolicy reads <= {FORMAT_VERSION}"
            )
        config = meta["config"]
        try:
            image_shape = tuple(int(s) for s in meta["image_shape"])
            module = feature_module(config)
            if len(image_shape) != 3:
                raise ValueError("image_shape must have 3 entries")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"feature-net config {cfg_path} is malformed: {e}") from None
        params = load_pytree(directory / WEIGHTS_FILE, what="feature-net weights")
        expected = jax.eval_shape(
            lambda: module.init(jax.random.PRNGKey(0), np.zeros((1,) + image_shape, np.float32))
        )
        exp_struct = jax.tree_util.tree_structure(expected)
        try:
            got_struct = jax.tree_util.tree_structure(params)
            ok = got_struct == exp_struct and all(
                tuple(np.shape(a)) == tuple(b.shape)
                for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected))
            )
        except Exception:
            ok = False
        if not ok:
            raise ValueError(
                f"feature-net weights {directory / WEIGHTS_FILE} do not match the architecture in {cfg_path}"
            )
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
        return cls(
            config=config,
            params=params,
            dataset_name=str(meta["dataset_name"]),
            image_shape=image_shape,
            test_accuracy=meta.get("test_accuracy"),
            info=meta.get("info") or {},
        )


def feature_asset_dir(dataset_name: str) -> Path:
    """The shipped asset directory for a built-in dataset's feature net."""
    return ASSET_ROOT / dataset_name


def load_feature_extractor(dataset_name: str) -> FeatureExtractor:
    """Load the shipped feature net for ``dataset_name`` from ``qpolicy/assets/features/<name>/``."""
    if not isinstance(dataset_name, str) or not dataset_name or any(c in dataset_name for c in ":/\\"):
        raise FileNotFoundError(
            f"no shipped feature net for dataset {dataset_name!r}: shipped nets exist only for built-in "
            f"dataset names; for user data train one with `python -m qpolicy.metrics train "
            f"'{dataset_name}' --out DIR` and load it with FeatureExtractor.load(DIR)"
        )
    d = feature_asset_dir(dataset_name)
    if not (d / WEIGHTS_FILE).is_file() or not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"no feature net for dataset {dataset_name!r} in {d} (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            f"create it with `python -m qpolicy.metrics train {dataset_name}`"
        )
    return FeatureExtractor.load(d)


# =========================================================================== training
def _accuracy(extractor: FeatureExtractor, images: np.ndarray, labels: np.ndarray) -> float:
    if len(images) == 0:
        return float("nan")
    logits = extractor.logits(images)
    return float(np.mean(np.argmax(logits, -1) == labels))


def train_feature_net(
    dataset_name: str,
    *,
    steps: int = 2000,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = True,
    lr: float = 2e-3,
    max_shift: int = 2,
    hflip: bool | None = None,
) -> FeatureExtractor:
    """Train a :class:`FeatureNet` classifier on ``load_dataset(dataset_name, "train")``.

    Adam(W) with warmup + cosine decay, random shifts of up to ``max_shift`` px (edge padding)
    and, by default, random horizontal flips for ``faces``/``patches``/user data (not
    ``digits``).  The returned extractor records its test-split accuracy.

    For ``faces`` the classifier is face-vs-non-face on 160 images: the resulting features
    are a weak feature space (see the module docstring).
    """
    import optax

    from qpolicy.data import load_dataset

    train = load_dataset(dataset_name, "train")
    test = load_dataset(dataset_name, "test")
    if train.num_classes < 2 or np.any(train.labels < 0):
        raise ValueError(
            f"dataset {dataset_name!r}: the feature net is a classifier and needs labels for every "
            f"training image with >= 2 classes (got num_classes={train.num_classes})"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1 (got steps={steps}, batch_size={batch_size})")
    if hflip is None:
        hflip = dataset_name != "digits"
    config = default_config(train.num_classes)
    module = feature_module(config)
    h, w, c = train.image_shape
    x_train = jnp.asarray(train.images)
    y_train = jnp.asarray(train.labels)
    n = x_train.shape[0]
    bs = min(batch_size, n)

    key = jax.random.PRNGKey(seed)
    key, init_key = jax.random.split(key)
    params = jax.jit(module.init)(init_key, jnp.zeros((1, h, w, c), jnp.float32))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr * 0.02)
    tx = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = tx.init(params)
    s = int(max_shift)

    def augment(k, xb):
        k1, k2, k3 = jax.random.split(k, 3)
        if s > 0:
            padded = jnp.pad(xb, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
            dy = jax.random.randint(k1, (xb.shape[0],), 0, 2 * s + 1)
            dx = jax.random.randint(k2, (xb.shape[0],), 0, 2 * s + 1)
            xb = jax.vmap(lambda im, a, b: jax.lax.dynamic_slice(im, (a, b, 0), (h, w, c)))(padded, dy, dx)
        if hflip:
            flip = jax.random.bernoulli(k3, 0.5, (xb.shape[0], 1, 1, 1))
            xb = jnp.where(flip, xb[:, :, ::-1], xb)
        return xb

    @jax.jit
    def step(params, opt_state, k):
        k_idx, k_aug = jax.random.split(k)
        idx = jax.random.choice(k_idx, n, (bs,), replace=False)
        xb = augment(k_aug, x_train[idx])
        yb = y_train[idx]

        def loss_fn(p):
            logits = module.apply(p, xb)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == yb)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"feature net [{dataset_name}]", file=sys.stderr)
    t0 = time.time()
    ema_loss = ema_acc = None
    for i in range(steps):
        key, k = jax.random.split(key)
        params, opt_state, loss, acc = step(params, opt_state, k)
        if bar is not None and (i % 25 == 0 or i == steps - 1):
            loss, acc = float(loss), float(acc)
            ema_loss = loss if ema_loss is None else 0.8 * ema_loss + 0.2 * loss
            ema_acc = acc if ema_acc is None else 0.8 * ema_acc + 0.2 * acc
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}")
            bar.update(i + 1 - bar.n)
    if bar is not None:
        bar.close()
    train_time = time.time() - t0
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    ext = FeatureExtractor(
        config=config,
        params=params,
        dataset_name=dataset_name,
        image_shape=train.image_shape,
        info={
            "steps": int(steps),
            "seed": int(seed),
            "batch_size": int(bs),
            "lr": float(lr),
            "max_shift": s,
            "hflip": bool(hflip),
            "n_train": int(n),
            "n_test": int(len(test)),
            "train_seconds": round(train_time, 1),
            "class_names": list(train.class_names),
        },
    )
    ext.test_accuracy = _accuracy(ext, test.images, test.labels)
    ext.info["train_accuracy"] = _accuracy(ext, train.images, train.labels)
    if progress:
        print(
            f"feature net [{dataset_name}]: test accuracy {ext.test_accuracy:.4f} on {len(test)} images, "
            f"train accuracy {ext.info['train_accuracy']:.4f}, {train_time:.0f}s",
            file=sys.stderr,
        )
    return ext


# =========================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qpolicy.features", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a feature net and save it (default: the shipped asset dir)")
    t.add_argument("dataset", help="digits | faces | patches | npz:/file.npz | cifar10:/dir")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--out", default=None, help="output directory (default qpolicy/assets/features/DATASET)")
    t.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "train":
        out = args.out
        if out is None:
            if any(c in args.dataset for c in ":/\\"):
                p.error("--out DIR is required for npz:/cifar10: datasets")
            out = feature_asset_dir(args.dataset)
        ext = train_feature_net(
            args.dataset,
            steps=args.steps,
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
            progress=not args.no_progress,
        )
        ext.save(out)
        print(f"saved feature net for {args.dataset!r} to {out} (test accuracy {ext.test_accuracy:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
