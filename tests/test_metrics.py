"""Tests for qpolicy.metrics and qpolicy.features: FD/KID/PRDC against known cases, feature-net persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qpolicy.features import FeatureExtractor, FeatureNet, default_config, feature_module, load_feature_extractor
from qpolicy.metrics import fd_real_split, frechet_distance, kid, precision_recall_coverage


# --------------------------------------------------------------------------- Fréchet distance
def test_frechet_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 0.0, -1.0, 2.0])
    var1, var2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 1.0, 2.0, 1.5])
    x = mu1 + rng.standard_normal((n, d)) * np.sqrt(var1)
    y = mu2 + rng.standard_normal((n, d)) * np.sqrt(var2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = frechet_distance(x, y)
    assert got == pytest.approx(expected, rel=0.02, abs=0.02)
    assert frechet_distance(y, x) == pytest.approx(got, rel=1e-6)  # symmetric


def test_frechet_identity_and_errors():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 16))
    assert abs(frechet_distance(x, x)) < 1e-6
    assert frechet_distance(x, x + 1.0) == pytest.approx(16.0, rel=1e-6)
    with pytest.raises(ValueError, match="feature dimensions differ: f1 has D=16, f2 has D=8"):
        frechet_distance(x, x[:, :8])
    with pytest.raises(ValueError, match="f2: needs at least 2 samples"):
        frechet_distance(x, x[:1])
    with pytest.raises(ValueError, match="f1: expected a 2-D"):
        frechet_distance(x[:, 0], x)


# --------------------------------------------------------------------------- KID
def test_kid_same_vs_shifted():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((600, 32))
    b = rng.standard_normal((600, 32))
    same = kid(a, b, subsets=5, subset_size=300)
    shifted = kid(a, b + 0.5, subsets=5, subset_size=300)
    assert abs(same) < 0.01
    assert shifted > 0.05 and shifted > 10 * abs(same)
    assert kid(a, b, subsets=5, subset_size=300, seed=3) == kid(a, b, subsets=5, subset_size=300, seed=3)


def test_kid_matches_direct_formula():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((20, 3)) + 0.3
    d, m = 3, 20
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    expected = (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )
    # subset_size = N: every subset is a permutation of all samples -> exact
    assert kid(x, y, subsets=3, subset_size=20) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="subset_size=30 exceeds"):
        kid(x, y, subset_size=30)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        kid(x, y[:, :2])


# --------------------------------------------------------------------------- PRDC
def test_precision_recall_coverage():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 8))
    same = precision_recall_coverage(real, real.copy(), k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert same["density"] >= 1.0
    far = precision_recall_coverage(real, real + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # fake covering only half the support: precision stays high, recall/coverage drop
    real2 = rng.standard_normal((1000, 2))
    half = real2[real2[:, 0] > 0]
    part = precision_recall_coverage(real2, half + 0.01 * rng.standard_normal(half.shape), k=5)
    assert part["precision"] > 0.9
    assert part["recall"] < 0.8 and part["coverage"] < 0.8
    with pytest.raises(ValueError, match="fake: needs at least 6 samples"):
        precision_recall_coverage(real, real[:5], k=5)
    with pytest.raises(ValueError, match="feature dimensions differ: real has D=8, fake has D=4"):
        precision_recall_coverage(real, real[:, :4])


# --------------------------------------------------------------------------- feature nets
def test_shipped_digits_extractor():
    from qpolicy.data import load_dataset

    ext = load_feature_extractor("digits")
    assert ext.image_shape == (16, 16, 1) and ext.dataset_name == "digits"
    assert ext.test_accuracy is not None and ext.test_accuracy > 0.97
    x = load_dataset("digits", "test").images[:50]
    f = ext.features(x, batch_size=32)
    assert f.shape == (50, 128) and f.dtype == np.float64 and np.all(np.isfinite(f))
    np.testing.assert_allclose(ext.features(x[:7]), f[:7], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"images: expected shape \(N, 16, 16, 1\)"):
        ext.features(np.zeros((2, 32, 32, 1), np.float32))


def test_shipped_faces_extractor():
    ext = load_feature_extractor("faces")
    assert ext.image_shape == (32, 32, 1) and ext.config["num_classes"] == 2


def test_missing_extractor_message():
    with pytest.raises(FileNotFoundError, match=r"python -m qpolicy.metrics train no_such_dataset"):
        load_feature_extractor("no_such_dataset")


def _tiny_extractor():
    import jax

    cfg = default_config(3)
    cfg.update(channels=[4, 8], strides=[1, 2], feature_dim=6, groups=2)
    params = jax.jit(feature_module(cfg).init)(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))
    return FeatureExtractor(config=cfg, params=params, dataset_name="tiny", image_shape=(8, 8, 1), test_accuracy=0.5)


def test_save_load_round_trip(tmp_path):
    ext = _tiny_extractor()
    ext.save(tmp_path / "fx")
    assert {p.name for p in (tmp_path / "fx").iterdir()} == {"feature_net.msgpack", "feature_net.json"}
    back = FeatureExtractor.load(tmp_path / "fx")
    assert back.config == ext.config and back.image_shape == (8, 8, 1) and back.test_accuracy == 0.5
    x = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(back.features(x), ext.features(x), rtol=1e-6, atol=1e-6)
    assert back.features(x).shape == (5, 6)
    assert isinstance(FeatureNet(num_classes=2), FeatureNet)


def test_corrupt_and_missing_files(tmp_path):
    ext = _tiny_extractor()
    d = ext.save(tmp_path / "fx")
    (d / "feature_net.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        FeatureExtractor.load(d)
    ext.save(d)
    (d / "feature_net.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FeatureExtractor.load(d)
    ext.save(d)
    meta = json.loads((d / "feature_net.json").read_text())
    meta["config"]["feature_dim"] = 7  # weights no longer match
    (d / "feature_net.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the architecture"):
        FeatureExtractor.load(d)
    (d / "feature_net.msgpack").unlink()
    with pytest.raises(FileNotFoundError, match="feature-net weights not found"):
        FeatureExtractor.load(d)
    with pytest.raises(FileNotFoundError, match="feature-net config not found"):
        FeatureExtractor.load(tmp_path / "empty")


def test_fd_real_split_faces_small():
    ext = load_feature_extractor("faces")
    with pytest.warns(UserWarning, match="has 200 images"):
        v = fd_real_split(ext, "faces", 150)
    assert v > 0 and np.isfinite(v)
    v2 = fd_real_split(ext, "faces", 20)  # test split has 40 = 2n
    assert v2 > 0
