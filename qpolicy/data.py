"""Image datasets for qpolicy: three offline built-ins plus user data.

Every dataset is returned as a :class:`Dataset` of ``float32`` images shaped
``(N, H, W, C)`` with values in ``[-1, 1]`` and ``int32`` labels (``-1`` where
unknown).  Nothing is downloaded: the built-ins come from files bundled with
scikit-learn and scikit-image.

Accepted names (``load_dataset(name, split)``):

* ``"digits"``  - scikit-learn's 8x8 handwritten digits (1797 images, 10
  classes), bilinearly resized to 16x16, 1 channel.  Fixed split: permutation
  with seed 0, the last 20% is ``test``.
* ``"faces"``   - scikit-image's ``lfw_subset`` (200 grayscale 25x25 images:
  the first 100 are faces, the last 100 non-face background crops), resized to
  32x32, 1 channel, labels ``face=1`` / ``non-face=0``.  Fixed 80/20 split,
  stratified by label, seed 0 (160 train / 40 test).
* ``"patches"`` - 32x32 RGB crops of scikit-image's bundled colour photographs
  (see :data:`PATCH_SOURCES`).  Each photo is first downscaled so its shorter
  side is 160 px.  Train crops lie entirely in the left 75% of each photo's
  columns, test crops entirely in the right 25%, so no pixel is shared.
  20000 train crops (random horizontal flips) and 2000 test crops (no flips),
  balanced across photos, positions from a fixed seed.  Label = photo index,
  ``class_names`` = photo names.
* ``"npz:/path/file.npz"`` - user images, see :func:`_load_npz`.
* ``"cifar10:/dir"`` - the standard CIFAR-10 python pickle batches, see
  :func:`_load_cifar10`.

``split`` is one of ``"train"``, ``"test"``, ``"all"``.

The built-in arrays are cached in-process and returned **read-only**
(``arr.flags.writeable == False``); copy them before modifying in place.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import pickle
from pathlib import Path

import numpy as np

from qpolicy.io import atomic_write_bytes

__all__ = [
    "BUILTIN",
    "SPLITS",
    "PATCH_SOURCES",
    "DataError",
    "Dataset",
    "load_dataset",
    "image_grid",
    "save_image_grid",
]

BUILTIN = ("digits", "faces", "patches")
SPLITS = ("train", "test", "all")
#: scikit-image photographs that ship with the wheel (no pooch download) and are
#: real 3-channel colour photos.  ("cat" is an alias of "chelsea"; "logo" and
#: "colorwheel" are synthetic; "kidney", "lily", "skin" need a download.)
PATCH_SOURCES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
PATCH_SIZE = 32
PATCH_SHORT_SIDE = 160
PATCH_TRAIN_FRACTION = 0.75  # of each photo's columns
PATCH_N_TRAIN = 20000
PATCH_N_TEST = 2000

_ACCEPTED_NAMES = (
    "'digits', 'faces', 'patches', 'npz:/path/to/file.npz', "
    "'cifar10:/path/to/cifar-10-batches-py'"
)


class DataError(ValueError):
    """A dataset is missing, malformed, or was asked for in an unsupported way."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # float32 (N, H, W, C) in [-1, 1]
    labels: np.ndarray  # int32 (N,), -1 where unknown
    num_classes: int  # 0 if no labels
    class_names: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------- helpers
def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


def _check_split(split: str, source: str) -> None:
    if split not in SPLITS:
        raise DataError(
            f"{source}: unknown split={split!r}; accepted split values are {', '.join(map(repr, SPLITS))}"
        )


def _resize_stack(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (order=1) resize of a (N, H, W) float stack."""
    from skimage.transform import resize

    anti_alias = size[0] < x.shape[1] or size[1] < x.shape[2]
    return np.stack(
        [resize(im, size, order=1, mode="edge", anti_aliasing=anti_alias, preserve_range=True) for im in x]
    )


def _make(name, images, labels, class_names) -> Dataset:
    images = np.ascontiguousarray(images, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    num_classes = len(class_names)
    return Dataset(name=name, images=images, labels=labels, num_classes=num_classes, class_names=tuple(class_names))


def _take(ds: Dataset, idx: np.ndarray, name: str | None = None) -> Dataset:
    images, labels = ds.images[idx], ds.labels[idx]
    _readonly(images, labels)
    return dataclasses.replace(ds, name=name or ds.name, images=images, labels=labels)


# --------------------------------------------------------------------------- built-ins
@functools.lru_cache(maxsize=None)
def digits_dataset(split: str) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float64) / 16.0  # (N, 8, 8) in [0, 1]
    x = _resize_stack(x, (16, 16))
    x = np.clip(x, 0.0, 1.0) * 2.0 - 1.0
    y = d.target.astype(np.int32)
    n = len(x)
    perm = np.random.default_rng(0).permutation(n)
    n_test = int(round(0.2 * n))
    idx = {"train": perm[: n - n_test], "test": perm[n - n_test :], "all": np.arange(n)}[split]
    ds = _make("digits", x[idx, :, :, None], y[idx], tuple(str(i) for i in range(10)))
    _readonly(ds.images, ds.labels)
    return ds


@functools.lru_cache(maxsize=None)
def _faces(split: str) -> Dataset:
    import skimage.data

    raw = np.asarray(skimage.data.lfw_subset(), dtype=np.float64)  # (200, 25, 25)
    if raw.max() > 1.0:  # documented as uint8, shipped as float in [0, 1]
        raw = raw / 255.0
    x = _resize_stack(raw, (32, 32))
    x = np.clip(x, 0.0, 1.0) * 2.0 - 1.0
    # skimage docstring: the first 100 images are faces, the next 100 non-faces.
    y = np.zeros(len(raw), np.int32)
    y[:100] = 1
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in (0, 1):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(0.2 * len(members)))
        train.append(members[: len(members) - n_test])
        test.append(members[len(members) - n_test :])
    idx = {
        "train": np.sort(np.concatenate(train)),
        "test": np.sort(np.concatenate(test)),
        "all": np.arange(len(raw)),
    }[split]
    ds = _make("faces", x[idx, :, :, None], y[idx], ("non-face", "face"))
    _readonly(ds.images, ds.labels)
    return ds


@functools.lru_cache(maxsize=None)
def patch_photos() -> tuple[np.ndarray, ...]:
    """The source photos, float32 in [-1, 1], shorter side PATCH_SHORT_SIDE."""
    import skimage.data
    from skimage.transform import resize

    photos = []
    for name in PATCH_SOURCES:
        try:
            im = np.asarray(getattr(skimage.data, name)())
        except Exception as e:  # pragma: no cover - depends on the installed scikit-image
            raise DataError(
                f"patches: scikit-image photo {name!r} could not be loaded offline ({type(e).__name__}: {e}); "
                f"the 'patches' dataset needs these bundled photos: {', '.join(PATCH_SOURCES)}"
            ) from None
        if im.ndim != 3 or im.shape[2] < 3:
            raise DataError(f"patches: scikit-image photo {name!r} has shape {im.shape}, expected (H, W, 3)")
        im = im[..., :3].astype(np.float64) / 255.0  # drop alpha
        h, w = im.shape[:2]
        scale = PATCH_SHORT_SIDE / min(h, w)
        new = (max(PATCH_SIZE, int(round(h * scale))), max(PATCH_SIZE, int(round(w * scale))))
        im = resize(im, new, order=1, mode="edge", anti_aliasing=scale < 1, preserve_range=True)
        im = (np.clip(im, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)
        photos.append(im)
    return tuple(photos)


def patch_column_split(width: int) -> int:
    """First column of the test region of a (downscaled) source photo of ``width`` columns."""
    return int(round(PATCH_TRAIN_FRACTION * width))


def _crops(im: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    r = np.arange(PATCH_SIZE)
    return im[ys[:, None, None] + r[None, :, None], xs[:, None, None] + r[None, None, :]]


def _balanced_counts(total: int, k: int) -> list[int]:
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


@functools.lru_cache(maxsize=None)
def _patches_split(split: str) -> Dataset:
    photos = patch_photos()
    k = len(photos)
    n_total = PATCH_N_TRAIN if split == "train" else PATCH_N_TEST
    rng = np.random.default_rng({"train": 1000, "test": 2000}[split])
    xs_all, ys_all = [], []
    for label, (im, n) in enumerate(zip(photos, _balanced_counts(n_total, k))):
        h, w = im.shape[:2]
        cut = patch_column_split(w)
        if split == "train":
            x_lo, x_hi = 0, cut - PATCH_SIZE  # inclusive range of left edges
        else:
            x_lo, x_hi = cut, w - PATCH_SIZE
        if x_hi < x_lo or h < PATCH_SIZE:
            raise DataError(f"patches: photo {PATCH_SOURCES[label]!r} ({h}x{w}) is too small for {split} crops")
        ys = rng.integers(0, h - PATCH_SIZE + 1, size=n)
        xs = rng.integers(x_lo, x_hi + 1, size=n)
        c = _crops(im, ys, xs)
        if split == "train":
            flip = rng.random(n) < 0.5
            c[flip] = c[flip, :, ::-1]
        xs_all.append(c)
        ys_all.append(np.full(n, label, np.int32))
    images = np.concatenate(xs_all)
    labels = np.concatenate(ys_all)
    perm = rng.permutation(len(images))
    ds = _make("patches", images[perm], labels[perm], PATCH_SOURCES)
    _readonly(ds.images, ds.labels)
    return ds


@functools.lru_cache(maxsize=None)
def _patches(split: str) -> Dataset:
    if split == "all":
        tr, te = _patches_split("train"), _patches_split("test")
        ds = dataclasses.replace(
            tr, images=np.concatenate([tr.images, te.images]), labels=np.concatenate([tr.labels, te.labels])
        )
        _readonly(ds.images, ds.labels)
        return ds
    return _patches_split(split)


# --------------------------------------------------------------------------- user data
def _to_unit_range(x: np.ndarray, source: str) -> np.ndarray:
    """Map uint8 [0,255], float [0,1] or float [-1,1] images to float32 [-1, 1]."""
    accepted = "uint8 in [0, 255], or float in [0, 1] or [-1, 1]"
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{source}: images have dtype {x.dtype}; accepted: {accepted}")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: integer images have values in [{lo}, {hi}]; accepted: {accepted}")
        return (x.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{source}: images contain NaN or infinite values; accepted: {accepted}")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        # Note: float data that is in [-1, 1] but happens to be all non-negative is read as [0, 1].
        return x * 2.0 - 1.0
    if lo >= -1.0 and hi <= 1.0:
        return x
    raise DataError(f"{source}: float images have values in [{lo:.4g}, {hi:.4g}]; accepted: {accepted}")


def _to_nhwc(x: np.ndarray, source: str) -> np.ndarray:
    accepted = "shape (N, H, W) or (N, H, W, C) with C in {1, 3}"
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim != 4:
        raise DataError(f"{source}: images have shape {x.shape} (ndim={x.ndim}); accepted: {accepted}")
    if x.shape[-1] not in (1, 3):
        raise DataError(f"{source}: images have C={x.shape[-1]} channels (shape {x.shape}); accepted: {accepted}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise DataError(f"{source}: images array is empty (shape {x.shape}); accepted: {accepted}, N >= 1")
    return x


def _labels_array(y, n: int, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise DataError(f"{source}: labels have shape {y.shape}, expected ({n},) to match the images")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{source}: labels have dtype {y.dtype}; accepted: integers >= -1 (-1 = unknown)")
    if y.size and y.min() < -1:
        raise DataError(f"{source}: labels contain {int(y.min())}; accepted: integers >= -1 (-1 = unknown)")
    return y.astype(np.int32)


def _load_npz(path_str: str, split: str, name: str) -> Dataset:
    """Load ``npz:/path/file.npz``.

    Images: key ``images``, else ``x``, else the only array in the file; shape
    (N, H, W) or (N, H, W, C) with C in {1, 3}; uint8 [0, 255] or float [0, 1]
    or [-1, 1] (a float array whose values are all in [0, 1] is read as [0, 1]).
    Optional labels under ``labels`` or ``y``.  Split: ``train``/``all`` return
    everything, ``test`` the last 10% (at least one image).
    """
    source = f"npz dataset {path_str!r}"
    path = Path(path_str).expanduser()
    if not path_str:
        raise DataError(f"{source}: empty path; accepted form is 'npz:/path/to/file.npz'")
    if not path.is_file():
        raise DataError(f"{source}: file not found; accepted form is 'npz:/path/to/file.npz' (an existing file)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{source}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if "images" in arrays:
        key = "images"
    elif "x" in arrays:
        key = "x"
    elif len(arrays) == 1:
        key = next(iter(arrays))
    else:
        raise DataError(
            f"{source}: no images key; found keys {sorted(arrays)}; accepted: an array under 'images' "
            f"(else 'x', else the file's only array), optional labels under 'labels' or 'y'"
        )
    x = _to_nhwc(np.asarray(arrays[key]), f"{source} key {key!r}")
    x = _to_unit_range(x, f"{source} key {key!r}")
    n = x.shape[0]
    lkey = "labels" if "labels" in arrays else ("y" if "y" in arrays else None)
    if lkey is not None and lkey != key:
        y = _labels_array(arrays[lkey], n, f"{source} key {lkey!r}")
        num = int(y.max()) + 1 if n and y.max() >= 0 else 0
        class_names = tuple(str(i) for i in range(num))
    else:
        y = np.full(n, -1, np.int32)
        class_names = ()
    ds = _make(name, x, y, class_names)
    if split == "test":
        n_test = max(1, n // 10)
        return _take(ds, np.arange(n - n_test, n))
    return ds


def _unpickle(path: Path, source: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"{source}: {path.name} is not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{source}: {path.name} holds a {type(d).__name__}, expected a dict with b'data' and b'labels'")
    # accept both bytes keys (python-2 pickles) and str keys
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_batch(path: Path, source: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path, source)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{source}: {path.name} lacks b'data' or b'labels' (keys: {sorted(d)})")
    data = np.asarray(d["data"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] == 0:
        raise DataError(f"{source}: {path.name} b'data' has shape {data.shape}, expected (N, 3072) uint8 (N >= 1)")
    if data.dtype != np.uint8:
        if np.issubdtype(data.dtype, np.integer) and data.min() >= 0 and data.max() <= 255:
            data = data.astype(np.uint8)
        else:
            raise DataError(f"{source}: {path.name} b'data' has dtype {data.dtype}, expected uint8")
    labels = np.asarray(d["labels"])
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{source}: {path.name} b'labels' has shape {labels.shape}, expected ({data.shape[0]},) to match b'data'"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC
    return images, labels


def _load_cifar10(dir_str: str, split: str, name: str) -> Dataset:
    """Load ``cifar10:/dir`` in the standard python pickle format.

    Train: whichever of ``data_batch_1`` .. ``data_batch_5`` exist (at least
    one); test: ``test_batch``; ``all``: both.  Optional ``batches.meta`` gives
    ``label_names``.  Files are Python pickles: load only directories you trust.
    """
    source = f"cifar10 dataset {dir_str!r}"
    d = Path(dir_str).expanduser()
    accepted = "a directory with data_batch_1..data_batch_5 and/or test_batch (CIFAR-10 python format)"
    if not dir_str or not d.is_dir():
        raise DataError(f"{source}: directory not found; accepted: 'cifar10:/dir', {accepted}")
    train_files = [d / f"data_batch_{i}" for i in range(1, 6) if (d / f"data_batch_{i}").is_file()]
    test_file = d / "test_batch"
    files: list[Path] = []
    if split in ("train", "all"):
        if not train_files:
            raise DataError(f"{source}: no data_batch_1..data_batch_5 files for the train split; accepted: {accepted}")
        files += train_files
    if split in ("test", "all"):
        if not test_file.is_file():
            raise DataError(f"{source}: test_batch not found for the {split} split; accepted: {accepted}")
        files.append(test_file)
    parts = [_cifar_batch(f, source) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{source}: negative labels found; expected class indices 0..9")
    meta = d / "batches.meta"
    if meta.is_file():
        m = _unpickle(meta, source)
        names = m.get("label_names")
        if names is None:
            raise DataError(f"{source}: batches.meta lacks b'label_names'")
        class_names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
        if labels.max() >= len(class_names):
            raise DataError(f"{source}: label {int(labels.max())} out of range for {len(class_names)} label_names")
    else:
        class_names = tuple(str(i) for i in range(max(10, int(labels.max()) + 1)))
    x = images.astype(np.float32) / 127.5 - 1.0
    return _make(name, x, labels, class_names)


# --------------------------------------------------------------------------- public
def load_dataset(name: str, split: str = "train") -> Dataset:
    """Load a dataset by name (see the module docstring for accepted names)."""
    if not isinstance(name, str):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}; accepted names: {_ACCEPTED_NAMES}")
    source = f"dataset {name!r}"
    _check_split(split, source)
    if name == "digits":
        return digits_dataset(split)
    if name == "faces":
        return _faces(split)
    if name == "patches":
        return _patches(split)
    if name.startswith("npz:"):
        return _load_npz(name[len("npz:") :], split, name)
    if name.startswith("cifar10:"):
        return _load_cifar10(name[len("cifar10:") :], split, name)
    raise DataError(f"unknown dataset name {name!r}; accepted names: {_ACCEPTED_NAMES}")


def image_grid(images: np.ndarray, nrow: int | None = None) -> np.ndarray:
    """Tile ``(N, H, W, C)`` (or ``(N, H, W)``) images in ``[-1, 1]`` into a uint8 ``(H', W', 3)`` grid.

    ``nrow`` is the number of images per row (default ``ceil(sqrt(N))``); images
    are separated and surrounded by 1 px of black padding.  Values outside
    ``[-1, 1]`` are clipped; C=1 is replicated to grey RGB.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"image_grid: images must be (N, H, W[, C]) with N >= 1 and C in {{1, 3}}, got shape {x.shape}")
    x = np.nan_to_num(x.astype(np.float32), nan=-1.0)
    x = np.clip(np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n, h, w, _ = x.shape
    if nrow is None:
        nrow = int(math.ceil(math.sqrt(n)))
    if int(nrow) < 1:
        raise ValueError(f"image_grid: nrow must be >= 1, got {nrow}")
    ncol = min(int(nrow), n)
    rows = int(math.ceil(n / ncol))
    grid = np.zeros((rows * (h + 1) + 1, ncol * (w + 1) + 1, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = x[i]
    return grid


def save_image_grid(path: str | os.PathLike, images: np.ndarray, nrow: int | None = None) -> Path:
    """Write :func:`image_grid` of ``images`` to ``path`` as a PNG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_grid(images, nrow)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
