"""Tests for qpolicy.data: built-in datasets, npz and CIFAR-10 loaders, image grids."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from qpolicy.data import (
    BUILTIN,
    PATCH_SIZE,
    DataError,
    Dataset,
    image_grid,
    load_dataset,
    save_image_grid,
)


# --------------------------------------------------------------------------- built-ins
@pytest.mark.parametrize(
    "name, shape, n_classes",
    [("digits", (16, 16, 1), 10), ("faces", (32, 32, 1), 2), ("patches", (32, 32, 3), 7)],
)
def test_builtin_shapes_ranges_dtypes(name, shape, n_classes):
    for split in ("train", "test"):
        ds = load_dataset(name, split)
        assert isinstance(ds, Dataset)
        assert ds.image_shape == shape
        assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
        assert ds.images.ndim == 4 and ds.labels.shape == (len(ds),)
        assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
        assert ds.images.max() - ds.images.min() > 1.0  # uses the range
        assert ds.num_classes == n_classes == len(ds.class_names)
        assert ds.labels.min() >= 0 and ds.labels.max() < n_classes
        assert len(np.unique(ds.labels)) == n_classes
    tr, te, al = (load_dataset(name, s) for s in ("train", "test", "all"))
    assert len(tr) + len(te) == len(al)


def test_builtin_sizes():
    assert (len(load_dataset("digits", "train")), len(load_dataset("digits", "test"))) == (1438, 359)
    faces_tr, faces_te = load_dataset("faces", "train"), load_dataset("faces", "test")
    assert (len(faces_tr), len(faces_te)) == (160, 40)
    assert np.bincount(faces_te.labels).tolist() == [20, 20]  # stratified
    assert faces_tr.class_names == ("non-face", "face")
    assert (len(load_dataset("patches", "train")), len(load_dataset("patches", "test"))) == (20000, 2000)
    counts = np.bincount(load_dataset("patches", "train").labels)
    assert counts.max() - counts.min() <= 1  # balanced across sources


def test_digits_and_faces_splits_disjoint():
    for name in ("digits", "faces"):
        tr, te = load_dataset(name, "train"), load_dataset(name, "test")
        a = {im.tobytes() for im in tr.images}
        b = {im.tobytes() for im in te.images}
        # digits has a few genuine duplicates in the source data; allow a handful
        assert len(a & b) <= 3


def test_patches_region_rule_and_no_shared_crop():
    from qpolicy.data import patch_photos, patch_column_split

    tr, te = load_dataset("patches", "train"), load_dataset("patches", "test")
    photos = patch_photos()
    rng = np.random.default_rng(0)
    # every sampled crop is found in its source photo inside the right region
    for ds, is_train in ((tr, True), (te, False)):
        for i in rng.choice(len(ds), 20, replace=False):
            crop, im = ds.images[i], photos[ds.labels[i]]
            cut = patch_column_split(im.shape[1])
            cands = [crop, crop[:, ::-1]] if is_train else [crop]
            found = None
            for c in cands:
                valid = im[: im.shape[0] - PATCH_SIZE + 1, : im.shape[1] - PATCH_SIZE + 1]
                for y0, x0 in np.argwhere(np.all(valid == c[0, 0], axis=-1)):
                    if np.array_equal(im[y0 : y0 + PATCH_SIZE, x0 : x0 + PATCH_SIZE], c):
                        found = (y0, x0)
                        break
                if found is not None:
                    break
            assert found is not None
            x0 = found[1]
            if is_train:
                assert x0 + PATCH_SIZE <= cut
            else:
                assert x0 >= cut
    a = {im.tobytes() for im in tr.images[:5000]}
    assert not any(im.tobytes() in a for im in te.images)


def test_deterministic_and_cached_readonly():
    for name in BUILTIN:
        a = load_dataset(name, "test")
        b = load_dataset(name, "test")
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert not a.images.flags.writeable
    from qpolicy.data import digits_dataset

    digits_dataset.cache_clear()
    c = load_dataset("digits", "train")
    digits_dataset.cache_clear()
    d = load_dataset("digits", "train")
    assert c is not d
    np.testing.assert_array_equal(c.images, d.images)


# --------------------------------------------------------------------------- npz
def test_npz_uint8_no_channel(tmp_path):
    x = np.zeros((20, 8, 6), np.uint8)
    x[:, 0, 0] = 255
    y = np.arange(20) % 3
    p = tmp_path / "d.npz"
    np.savez(p, images=x, labels=y)
    ds = load_dataset(f"npz:{p}")
    assert ds.images.shape == (20, 8, 6, 1) and ds.images.dtype == np.float32
    assert ds.images[0, 0, 0, 0] == 1.0 and ds.images[0, 1, 1, 0] == -1.0
    assert ds.num_classes == 3 and ds.labels.tolist() == y.tolist()
    te = load_dataset(f"npz:{p}", "test")
    assert len(te) == 2
    np.testing.assert_array_equal(te.labels, y[-2:])
    assert len(load_dataset(f"npz:{p}", "all")) == 20


def test_npz_float_ranges_and_keys(tmp_path):
    rng = np.random.default_rng(0)
    x01 = rng.random((5, 4, 4, 3)).astype(np.float32)
    p = tmp_path / "a.npz"
    np.savez(p, x=x01)  # key 'x', no labels
    ds = load_dataset(f"npz:{p}")
    np.testing.assert_allclose(ds.images, x01 * 2 - 1, atol=1e-6)
    assert ds.num_classes == 0 and np.all(ds.labels == -1) and ds.class_names == ()
    xpm = (rng.random((5, 4, 4, 1)) * 2 - 1).astype(np.float64)
    p2 = tmp_path / "b.npz"
    np.savez(p2, whatever=xpm)  # the only array
    np.testing.assert_allclose(load_dataset(f"npz:{p2}").images, xpm, atol=1e-6)


def test_npz_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    p = tmp_path / "two.npz"
    np.savez(p, a=np.zeros((2, 4, 4)), b=np.zeros(2))
    with pytest.raises(DataError, match="no images key.*'images'"):
        load_dataset(f"npz:{p}")
    p = tmp_path / "ndim.npz"
    np.savez(p, images=np.zeros((4, 4)))
    with pytest.raises(DataError, match=r"ndim=2.*\(N, H, W\)"):
        load_dataset(f"npz:{p}")
    p = tmp_path / "c.npz"
    np.savez(p, images=np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(DataError, match=r"C=2 channels"):
        load_dataset(f"npz:{p}")
    p = tmp_path / "empty.npz"
    np.savez(p, images=np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(DataError, match="empty"):
        load_dataset(f"npz:{p}")
    p = tmp_path / "nan.npz"
    x = np.zeros((2, 4, 4), np.float32)
    x[0, 0, 0] = np.nan
    np.savez(p, images=x)
    with pytest.raises(DataError, match="NaN"):
        load_dataset(f"npz:{p}")
    p = tmp_path / "range.npz"
    np.savez(p, images=np.full((2, 4, 4), 3.0))
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        load_dataset(f"npz:{p}")
    p = tmp_path / "labels.npz"
    np.savez(p, images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2, int))
    with pytest.raises(DataError, match="labels have shape"):
        load_dataset(f"npz:{p}")
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_dataset(f"npz:{p}")


# --------------------------------------------------------------------------- cifar10
def _write_batch(path, data, labels, str_keys=False):
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    with open(path, "wb") as f:
        pickle.dump({k("data"): data, k("labels"): list(labels), k("batch_label"): b"x"}, f)


def _cifar_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar"
    d.mkdir()
    batches = []
    for i in (1, 2):
        data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 5)
        _write_batch(d / f"data_batch_{i}", data, labels)
        batches.append((data, labels))
    test = np.zeros((5, 3072), np.uint8)
    # image 2: pixel (row 3, col 7), channel G (plane 1) = 255; channel B at (0, 31) = 255
    test[2, 1024 + 3 * 32 + 7] = 255
    test[2, 2048 + 0 * 32 + 31] = 255
    _write_batch(d / "test_batch", test, [0, 1, 2, 3, 4])
    names = [f"class{i}".encode() for i in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 5}, f)
    return d, batches


def test_cifar10_loader_layout(tmp_path):
    d, batches = _cifar_dir(tmp_path)
    tr = load_dataset(f"cifar10:{d}", "train")
    assert tr.images.shape == (10, 32, 32, 3) and tr.images.dtype == np.float32
    assert tr.labels.tolist() == list(batches[0][1]) + list(batches[1][1])
    assert tr.class_names[3] == "class3" and tr.num_classes == 10
    # first batch, image 0: R plane value at pixel (r, c) is data[r*32 + c]
    raw = batches[0][0][0]
    for r, c, ch in [(0, 0, 0), (5, 9, 1), (31, 30, 2)]:
        expect = raw[ch * 1024 + r * 32 + c] / 127.5 - 1.0
        assert tr.images[0, r, c, ch] == pytest.approx(expect, abs=1e-6)
    te = load_dataset(f"cifar10:{d}", "test")
    assert te.images.shape == (5, 32, 32, 3)
    im = te.images[2]
    assert im[3, 7, 1] == 1.0 and im[0, 31, 2] == 1.0
    assert np.sum(im > -1.0) == 2
    assert len(load_dataset(f"cifar10:{d}", "all")) == 15


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    d = tmp_path / "c"
    d.mkdir()
    with pytest.raises(DataError, match="no data_batch_1"):
        load_dataset(f"cifar10:{d}", "train")
    with pytest.raises(DataError, match="test_batch not found"):
        load_dataset(f"cifar10:{d}", "test")
    _write_batch(d / "data_batch_1", np.zeros((5, 3000), np.uint8), range(5))
    with pytest.raises(DataError, match=r"shape \(5, 3000\).*\(N, 3072\)"):
        load_dataset(f"cifar10:{d}", "train")
    (d / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable CIFAR-10 pickle"):
        load_dataset(f"cifar10:{d}", "train")
    _write_batch(d / "data_batch_1", np.zeros((5, 3072), np.uint8), range(4))
    with pytest.raises(DataError, match="labels"):
        load_dataset(f"cifar10:{d}", "train")


# --------------------------------------------------------------------------- names/splits
def test_bad_split_and_unknown_name():
    with pytest.raises(DataError, match=r"split='val'.*'train', 'test', 'all'"):
        load_dataset("digits", "val")
    with pytest.raises(DataError, match=r"unknown dataset name 'mnist'.*digits.*npz:.*cifar10:"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="split"):
        load_dataset("npz:/x.npz", "validation")
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- grids
def test_image_grid_and_png(tmp_path):
    x = -np.ones((5, 4, 3, 1), np.float32)
    x[1] = 1.0
    g = image_grid(x, nrow=3)
    assert g.dtype == np.uint8 and g.shape == (2 * 5 + 1, 3 * 4 + 1, 3)
    assert g[1, 1 + 4].tolist() == [255, 255, 255]  # image 1 is white
    assert g[1, 1].tolist() == [0, 0, 0] and g[0, 0].tolist() == [0, 0, 0]
    assert image_grid(np.zeros((4, 2, 2, 3))).shape == (7, 7, 3)  # default nrow = ceil(sqrt(4))
    with pytest.raises(ValueError, match="shape"):
        image_grid(np.zeros((2, 4, 4, 2)))
    p = save_image_grid(tmp_path / "sub" / "grid.png", x)
    from PIL import Image

    im = np.asarray(Image.open(p))
    assert im.shape == image_grid(x).shape
    np.testing.assert_array_equal(im, image_grid(x))
