"""Distribution and trajectory metrics: Fréchet distance, KID, precision/recall/density/coverage in a feature
space (:mod:`qpolicy.features`), and the cheap thumbnail-feature Fréchet proxy the envs use as a reward term.

All feature-space metrics are pure functions of feature arrays, computed in float64 with numpy/scipy.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from qpolicy.features import FeatureExtractor, load_feature_extractor

__all__ = ["frechet_distance", "kid", "precision_recall_coverage", "fd_real_split", "sample_quality",
           "real_reference", "thumbnail_features", "fd_proxy"]


def _as_features(x, arg: str, min_samples: int = 2) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{arg}: expected a 2-D feature array (N, D), got shape {a.shape}")
    if a.shape[0] < min_samples:
        raise ValueError(f"{arg}: needs at least {min_samples} samples, got {a.shape[0]}")
    if a.shape[1] < 1:
        raise ValueError(f"{arg}: feature dimension is 0")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{arg}: contains NaN or infinite values")
    return a


def _check_dims(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {na} has D={a.shape[1]}, {nb} has D={b.shape[1]}")


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D).

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with unbiased covariances;
    the real part of ``sqrtm`` is used and tiny negative results are clipped to 0.
    """
    import scipy.linalg

    a = _as_features(f1, "f1")
    b = _as_features(f2, "f2")
    _check_dims(a, b, "f1", "f2")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.atleast_2d(np.cov(a, rowvar=False))
    s2 = np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        eps = 1e-6
        off = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    scale = max(1.0, float(np.trace(s1) + np.trace(s2)))
    if fd < 0:
        if fd < -1e-6 * scale:
            warnings.warn(f"frechet_distance: negative value {fd:.3g} clipped to 0 (numerical error)")
        fd = 0.0
    return fd


def kid(
    f1: np.ndarray,
    f2: np.ndarray,
    *,
    subsets: int = 10,
    subset_size: int | None = None,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with the cubic
    polynomial kernel ``k(x, y) = (x·y / d + 1)^3``, averaged over ``subsets`` random subsets
    of ``subset_size`` samples (default ``min(1000, N1, N2)``) drawn without replacement.
    Can be slightly negative for identical distributions (unbiased estimator).
    """
    a = _as_features(f1, "f1")
    b = _as_features(f2, "f2")
    _check_dims(a, b, "f1", "f2")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(1000, a.shape[0], b.shape[0]) if subset_size is None else int(subset_size)
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {m}")
    if m > a.shape[0] or m > b.shape[0]:
        raise ValueError(
            f"subset_size={m} exceeds the number of samples (f1 has {a.shape[0]}, f2 has {b.shape[0]})"
        )
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        mmd = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2.0 * kxy.mean()
        )
        vals.append(mmd)
    return float(np.mean(vals))


def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(a, b)


def _kth_nn_radius(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row (self excluded)."""
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], chunk):
        d = _pairwise_dist(x[i : i + chunk], x)
        # column k of the partition: index 0 is the point itself (distance 0)
        out[i : i + chunk] = np.partition(d, k, axis=1)[:, k]
    return out


def precision_recall_coverage(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

    * precision: fraction of ``fake`` inside at least one real k-NN ball;
    * recall: fraction of ``real`` inside at least one fake k-NN ball;
    * density: ``1/(k M) Σ_j #{i : fake_j in ball(real_i)}`` (can exceed 1);
    * coverage: fraction of real points whose ball contains at least one fake point.

    Balls use the distance to the k-th nearest neighbour (self excluded), so each set
    needs more than ``k`` samples.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    k = int(k)
    r = _as_features(real, "real", min_samples=max(2, k + 1))
    f = _as_features(fake, "fake", min_samples=max(2, k + 1))
    _check_dims(r, f, "real", "fake")
    r_rad = _kth_nn_radius(r, k)
    f_rad = _kth_nn_radius(f, k)
    chunk = 2048
    in_real_ball_count = np.zeros(f.shape[0])  # per fake: number of real balls containing it
    real_covered = np.zeros(r.shape[0], bool)  # per real: nearest fake within its ball
    real_in_fake = np.zeros(r.shape[0], bool)  # per real: inside some fake ball (recall)
    for i in range(0, r.shape[0], chunk):
        d = _pairwise_dist(r[i : i + chunk], f)  # (chunk_r, M)
        inside = d <= r_rad[i : i + chunk, None]
        in_real_ball_count += inside.sum(0)
        real_covered[i : i + chunk] = d.min(1) <= r_rad[i : i + chunk]
        real_in_fake[i : i + chunk] = np.any(d <= f_rad[None, :], axis=1)
    return {
        "precision": float(np.mean(in_real_ball_count > 0)),
        "recall": float(np.mean(real_in_fake)),
        "density": float(in_real_ball_count.sum() / (k * f.shape[0])),
        "coverage": float(np.mean(real_covered)),
    }


def real_reference(dataset_name: str, n: int) -> tuple[np.ndarray, int]:
    """Shuffled real images for an n-sample comparison and the half size m.

    Uses the test split if it holds >= 2n images, else all data (for ``digits`` that includes
    training images: the test split has 360); if even that holds fewer than 2n, m = len // 2
    (with a warning). Selection: permutation seed 0."""
    from qpolicy.data import load_dataset

    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n}")
    n = int(n)
    ds = load_dataset(dataset_name, "test")
    if len(ds) < 2 * n:
        ds = load_dataset(dataset_name, "all")
    m = n
    if len(ds) < 2 * n:
        m = len(ds) // 2
        if m < 2:
            raise ValueError(f"dataset {dataset_name!r} has only {len(ds)} images; needs >= 4")
        warnings.warn(f"dataset {dataset_name!r} has {len(ds)} images (< 2n = {2 * n}); "
                      f"comparing against disjoint halves of {m} images each")
    perm = np.random.default_rng(0).permutation(len(ds))
    return np.asarray(ds.images)[perm[: 2 * m]], m


def fd_real_split(extractor: FeatureExtractor, dataset_name: str, n: int) -> float:
    """Reference Fréchet distance between two disjoint sets of real images (the floor).

    The "floor" to compare a model's FD against when it is computed with ``n`` generated
    vs ``n`` real samples; the real sets are those of :func:`real_reference`."""
    real, m = real_reference(dataset_name, n)
    return frechet_distance(extractor.features(real[:m]), extractor.features(real[m:]))


def sample_quality(samples: np.ndarray, dataset_name: str, *, extractor: FeatureExtractor | None = None,
                   real_features: tuple[np.ndarray, np.ndarray] | None = None,
                   with_train: bool = False) -> dict[str, float]:
    """Distribution metrics of ``samples`` (N, H, W, C) against real images of ``dataset_name``.

    Returns fd (samples vs the first real half), fd_real_split (first vs second real half: the
    floor), kid, precision, recall, density, coverage, n and n_real (the half size); with_train adds
    fd_train and fd_train_vs_heldout."""
    extractor = extractor or load_feature_extractor(dataset_name)
    f_fake = extractor.features(np.asarray(samples))
    if real_features is None:
        real, m = real_reference(dataset_name, len(samples))
        real_features = (extractor.features(real[:m]), extractor.features(real[m:]))
    ra, rb = real_features
    out = {"fd": frechet_distance(f_fake, ra), "fd_real_split": frechet_distance(ra, rb),
           "kid": kid(f_fake, ra), **precision_recall_coverage(ra, f_fake)}
    out = {**out, "n": int(len(samples)), "n_real": int(len(ra))}
    if with_train:
        # Samples vs the training images, and training vs held-out images: where the held-out split is a
        # different region of the data (patches: other columns of each photo), fd_train_vs_heldout is the
        # gap a perfect model of the training distribution would still show.
        from qpolicy.data import load_dataset

        tr = np.asarray(load_dataset(dataset_name, "train").images)
        ft = extractor.features(tr[np.random.default_rng(1).permutation(len(tr))[: len(ra)]])
        out.update(fd_train=frechet_distance(f_fake, ft), fd_train_vs_heldout=frechet_distance(ft, ra))
    return out


def thumbnail_features(x: jax.Array, s: int) -> jax.Array:
    """Per-image features (B, s*s*C + 2) of images x (B, H, W, C): s x s average-pool thumbnail, mean, std."""
    B, H, W, C = x.shape
    if H % s == 0 and W % s == 0:
        th = x.reshape(B, s, H // s, s, W // s, C).mean((2, 4))
    else:
        th = jax.image.resize(x, (B, s, s, C), "linear", antialias=True)
    return jnp.concatenate([th.reshape(B, -1), x.mean((1, 2, 3))[:, None], x.std((1, 2, 3))[:, None]], -1)


def fd_proxy(x_hat: jax.Array, x: jax.Array, thumb_size: int = 4) -> jax.Array:
    """Diagonal-Gaussian Fréchet distance between the thumbnail-feature distributions of two image sets
    (B, H, W, C) (:func:`thumbnail_features`; per feature μ and population σ over the B images), averaged over
    features: mean((μ̂ − μ)² + (σ̂ − σ)²)."""
    fa, fb = thumbnail_features(x_hat, thumb_size), thumbnail_features(x, thumb_size)
    return jnp.mean((fa.mean(0) - fb.mean(0)) ** 2 + (fa.std(0) - fb.std(0)) ** 2)


if __name__ == "__main__":  # `python -m qpolicy.metrics train DATASET` (documented earlier) = qpolicy.features
    from qpolicy.features import main

    raise SystemExit(main())
