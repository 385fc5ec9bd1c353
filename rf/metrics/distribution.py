"""Distances between a sample set and a reference set (features or raw vectors).

- MMD² (unbiased) with a sum of Gaussian kernels k(a, b) = exp(−‖a − b‖² / (2h²)).
- Fréchet distance between Gaussians fitted to two feature sets:
  ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (FID when the features are InceptionV3's). The Gaussians'
  moments are :class:`GaussianMoments`, which workers fill batch by batch and a driver merges.
- Precision / recall on k-NN manifolds (Kynkäänniemi et al. 2019): a point is "in" a set's
  manifold when it lies within the distance from some member of that set to the member's k-th
  nearest neighbour. Precision = share of generated points in the real manifold; recall = share of
  real points in the generated manifold.

Pairwise distances use ‖q − s‖² = ‖q‖² + ‖s‖² − 2 q·s (one matrix product), clamped at 0 against
rounding. The k-NN metrics compute them a block of query rows against all support rows at a time,
in torch on the inputs' device (a GPU worker's, or the CPU), so their memory is O(block · N) and
not O(N²); see :data:`DISTANCE_BLOCK_BYTES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

DISTANCE_BLOCK_BYTES = 128 * 2**20
"""Bytes of the block of distances that the k-NN metrics hold at a time when ``block`` is not
given: query rows per block = budget ÷ (support points × bytes of an element)."""


def _rows(x: torch.Tensor | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """``x`` as a float64 tensor of shape (points, features) on ``device`` (default: ``x``'s own
    device; the CPU for arrays)."""
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.array(x))
    x = x.detach()
    rows = x.reshape(len(x), math.prod(x.shape[1:]))
    return rows.to(device=x.device if device is None else device, dtype=torch.float64)


def _features(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return _rows(x, "cpu").numpy()


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖² of each row, without an n × d temporary."""
    return torch.einsum("ij,ij->i", x, x)


def _squared_distances(
    queries: torch.Tensor,
    support: torch.Tensor,
    support_sq: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """max(0, ‖q_i‖² + ‖s_j‖² − 2 q_i·s_j) for every query row i and support row j, written into
    ``out`` when given; ``support_sq`` is ‖s_j‖² when already known. The product is added in
    place, so no second (queries × support) matrix is made."""
    if support_sq is None:
        support_sq = _squared_norms(support)
    d = torch.add(_squared_norms(queries)[:, None], support_sq[None, :], out=out)
    return d.addmm_(queries, support.T, alpha=-2.0).clamp_(min=0.0)


def _per_query(
    queries: torch.Tensor,
    support: torch.Tensor,
    block: int | None,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``reduce`` of each block of rows of the matrix of squared distances (‖q_i − s_j‖²)_ij (a new
    tensor of one value per row), concatenated. Blocks have ``block`` query rows (default: as many
    as fit in :data:`DISTANCE_BLOCK_BYTES`) and are written into one buffer in turn, which
    ``reduce`` may overwrite: one block exists at a time, and no block costs fresh pages."""
    if block is None:
        block = max(1, DISTANCE_BLOCK_BYTES // (len(support) * support.element_size()))
    support_sq = _squared_norms(support)
    buffer = support.new_empty(min(block, len(queries)), len(support))
    values = []
    for start in range(0, len(queries), block):
        rows = queries[start : start + block]
        values.append(reduce(_squared_distances(rows, support, support_sq, out=buffer[: len(rows)])))
    return torch.cat(values)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased MMD² between samples x and y with Gaussian kernels.

    ``bandwidths=None`` uses the median pairwise distance of the pooled sample times
    (0.5, 1, 2). Memory is O((n + m)²): the median needs every pairwise distance."""
    a, b = _rows(x), _rows(y)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("MMD needs at least two points in each set")
    d_aa, d_bb, d_ab = (_squared_distances(p, q).cpu().numpy() for p, q in ((a, a), (b, b), (a, b)))
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


@dataclass(frozen=True, eq=False)
class GaussianMoments:
    """Count n, mean μ and scatter M of a feature set, mergeable across batches and workers.

    For rows x_1 … x_n: μ = (1/n) Σ x_i, M = Σ (x_i − μ)(x_i − μ)ᵀ, and the unbiased covariance is
    Σ = M / (n − 1). One batch's moments are computed in two passes (mean, then centred products),
    as ``np.cov`` does. Two disjoint sets A and B merge exactly (Chan, Golub & LeVeque 1979):

        n = n_A + n_B,   δ = μ_B − μ_A,   μ = μ_A + δ·n_B/n,   M = M_A + M_B + δδᵀ·n_A·n_B/n,

    so any split of the rows into batches, merged in any order, gives the moments of the whole set
    up to rounding. Unlike Σ x xᵀ − n μμᵀ, no term grows with ‖μ‖² only to cancel, so the rounding
    error does not grow with ‖μ‖² ÷ variance. A worker folds its batches in with :meth:`update`,
    ships :meth:`to_arrays` (fixed size: 1 + d + d² numbers), and the driver rebuilds them with
    :meth:`from_arrays` and combines them with :meth:`merge`.
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> GaussianMoments:
        """The moments of no rows in ``dim`` dimensions (the identity of :meth:`merge`)."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> GaussianMoments:
        """The moments of one batch of feature vectors (rows; further axes are flattened)."""
        f = _features(features)
        if len(f) == 0:
            return cls.empty(f.shape[1])
        mean = f.mean(0)
        centred = f - mean
        return cls(len(f), mean, centred.T @ centred)

    def update(self, features: torch.Tensor | np.ndarray) -> GaussianMoments:
        """The moments of these rows together with ``features``."""
        return self.merge(GaussianMoments.of(features))

    def merge(self, other: GaussianMoments) -> GaussianMoments:
        """The moments of the union of two disjoint sets (the class docstring's formula)."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"moments of different dimensions: {self.mean.shape[0]} vs {other.mean.shape[0]}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / count)
        return GaussianMoments(count, mean, scatter)

    @property
    def covariance(self) -> np.ndarray:
        """Σ = M / (n − 1)."""
        if self.count < 2:
            raise ValueError("statistics need at least two feature vectors")
        return self.scatter / (self.count - 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``count`` (int64, a scalar), ``mean`` (float64, d) and ``scatter`` (float64, d × d)."""
        return {"count": np.array(self.count, np.int64), "mean": self.mean.copy(), "scatter": self.scatter.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> GaussianMoments:
        """The inverse of :meth:`to_arrays`; ValueError naming the array that does not fit."""
        count = np.asarray(arrays["count"])
        mean = np.asarray(arrays["mean"], np.float64)
        scatter = np.asarray(arrays["scatter"], np.float64)
        if count.shape != () or count.dtype.kind not in "iu" or count < 0:
            raise ValueError(f"'count' must be one non-negative integer, got {count!r}")
        if mean.ndim != 1:
            raise ValueError(f"'mean' must be a vector, got shape {mean.shape}")
        if scatter.shape != (len(mean), len(mean)):
            raise ValueError(f"'scatter' must be {len(mean)} × {len(mean)}, got shape {scatter.shape}")
        return cls(int(count), mean.copy(), scatter.copy())


def gaussian_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set."""
    moments = GaussianMoments.of(features)
    return moments.mean, moments.covariance


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


def _knn_radii(points: torch.Tensor, k: int, block: int | None) -> torch.Tensor:
    """r_i = distance from point i to its k-th nearest neighbour, the point itself being its 0-th:
    the square root of the (k+1)-th smallest squared distance of row i, ties counted with
    multiplicity (√ is monotone, so it commutes with taking the (k+1)-th smallest)."""
    return _per_query(points, points, block, lambda d: d.topk(k + 1, dim=1, largest=False).values[:, k]).sqrt_()


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int | None) -> float:
    """Share of queries q with ‖q − s_j‖ ≤ r_j for some support point s_j, tested as
    min_j (‖q − s_j‖ − r_j) ≤ 0: with gradual underflow the rounded difference of two floats x − r
    is ≤ 0 exactly when x ≤ r, and subtracting in place needs no (queries × support) mask."""
    inside = _per_query(queries, support, block, lambda d: d.sqrt_().sub_(radii[None, :]).amin(1) <= 0)
    return int(inside.sum()) / len(queries)


def precision_recall(
    real: torch.Tensor | np.ndarray,
    generated: torch.Tensor | np.ndarray,
    k: int = 3,
    *,
    block: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """(precision, recall) of ``generated`` against ``real`` on k-NN manifolds.

    Distances are float64, computed ``block`` query rows against a whole set at a time (default:
    as many rows as fit in :data:`DISTANCE_BLOCK_BYTES`), so peak memory is O(block · N) besides
    the inputs. They run on ``device`` (default: ``real``'s device; the CPU for arrays). The
    k-th smallest distance and the ≤ test do not depend on the order in which distances arrive,
    so the block size changes nothing as long as each pair's distance is computed the same way.
    A BLAS may add the d terms of q·s in another order for matrices of other shapes (a few ulps),
    which can move only a point lying that close to a radius.
    """
    if block is not None and block < 1:
        raise ValueError(f"block must be at least 1 row, got {block}")
    a = _rows(real, device)
    b = _rows(generated, a.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets of different dimensions: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    precision = _coverage(b, a, _knn_radii(a, k, block), block)
    recall = _coverage(a, b, _knn_radii(b, k, block), block)
    return precision, recall
