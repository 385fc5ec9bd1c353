"""Distances between a sample set and a reference set (features or raw vectors).

- MMD² (unbiased) with a sum of Gaussian kernels k(a, b) = exp(−‖a − b‖² / (2h²)).
- Fréchet distance between Gaussians fitted to two feature sets:
  ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (FID when the features are InceptionV3's).
- Precision / recall on k-NN manifolds (Kynkäänniemi et al. 2019): a point is "in" a set's
  manifold when it lies within the distance from some member of that set to the member's k-th
  nearest neighbour. Precision = share of generated points in the real manifold; recall = share of
  real points in the generated manifold.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def _features(x: torch.Tensor | np.ndarray) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return array.reshape(array.shape[0], -1).astype(np.float64)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased MMD² between samples x and y with Gaussian kernels.

    ``bandwidths=None`` uses the median pairwise distance of the pooled sample times
    (0.5, 1, 2)."""
    a, b = _features(x), _features(y)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("MMD needs at least two points in each set")
    d_aa, d_bb, d_ab = _squared_distances(a, a), _squared_distances(b, b), _squared_distances(a, b)
    if bandwidths is None:
        pooled = np.concatenate([d_aa[np.triu_indices(len(a), 1)], d_bb[np.triu_indices(len(b), 1)], d_ab.ravel()])
        median = float(np.sqrt(np.median(pooled)))
        bandwidths = tuple(median * f for f in (0.5, 1.0, 2.0))

    def kernel(d: np.ndarray) -> np.ndarray:
        return sum(np.exp(-d / (2.0 * h * h)) for h in bandwidths)

    k_aa, k_bb, k_ab = kernel(d_aa), kernel(d_bb), kernel(d_ab)
    n, m = len(a), len(b)
    term_aa = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    term_bb = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(term_aa + term_bb - 2.0 * k_ab.mean())


def gaussian_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set."""
    f = _features(features)
    if len(f) < 2:
        raise ValueError("statistics need at least two feature vectors")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(cov1)) * 1e-6
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def frechet_distance_of_features(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(*gaussian_statistics(x), *gaussian_statistics(y))


def _knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    d = _squared_distances(points, points)
    # the 0-th smallest entry of a row is the point itself
    return np.sqrt(np.partition(d, k, axis=1)[:, k])


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> float:
    inside = 0
    for start in range(0, len(queries), chunk):
        d = np.sqrt(_squared_distances(queries[start : start + chunk], support))
        inside += int(np.count_nonzero((d <= radii[None, :]).any(1)))
    return inside / len(queries)


def precision_recall(
    real: torch.Tensor | np.ndarray, generated: torch.Tensor | np.ndarray, k: int = 3
) -> tuple[float, float]:
    """(precision, recall) of ``generated`` against ``real`` on k-NN manifolds."""
    a, b = _features(real), _features(generated)
    if min(len(a), len(b)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    precision = _coverage(b, a, _knn_radii(a, k))
    recall = _coverage(a, b, _knn_radii(b, k))
    return precision, recall
