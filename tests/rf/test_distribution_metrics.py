"""Blocked k-NN precision/recall against the plain N × N computation, and mergeable moments."""

import functools
import io

import numpy as np
import pytest
import torch

from rf.metrics import GaussianMoments, distribution, gaussian_statistics, precision_recall
from rf.metrics.distribution import _knn_radii, _per_query, _rows


def reference_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The plain, unblocked computation the library used before blocking: all of ‖a_i − b_j‖."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d, 0.0))


def reference_radii(points: np.ndarray, k: int) -> np.ndarray:
    return np.partition(reference_distances(points, points), k, axis=1)[:, k]


def reference_precision_recall(real: np.ndarray, generated: np.ndarray, k: int) -> tuple[float, float]:
    def coverage(queries: np.ndarray, support: np.ndarray) -> float:
        inside = reference_distances(queries, support) <= reference_radii(support, k)[None, :]
        return float(inside.any(1).mean())

    return coverage(generated, real), coverage(real, generated)


def blocks_for(n: int) -> list[int | None]:
    return sorted({1, 2, 7, max(1, n - 1), n, n + 5}) + [None]


def grid_points(n: int, seed: int) -> np.ndarray:
    """n points of {−3/8, …, 3/8}³: duplicates and equal distances abound, and every product and
    partial sum of the distance formula is a multiple of 1/64 smaller than 2 in magnitude, so it
    is exact in float64 whatever order a BLAS adds in."""
    return np.random.default_rng(seed).integers(-3, 4, size=(n, 3)) / 8.0


GRID_CASES = [(5, 3), (9, 1), (40, 3), (97, 5)]


def grid_sets(n: int) -> tuple[np.ndarray, np.ndarray]:
    return grid_points(n, seed=n), grid_points(n + 3, seed=n + 1)


@pytest.mark.parametrize(("n", "k"), GRID_CASES[1:])
def test_the_grid_data_has_ties(n, k):
    """Several neighbours share a k-th distance, and a generated point lies exactly on a radius."""
    real, generated = grid_sets(n)
    nearest = np.sort(reference_distances(real, real), axis=1)
    assert (nearest[:, k] == nearest[:, k + 1]).any()
    assert (reference_distances(generated, real) == nearest[None, :, k]).any()


@pytest.mark.parametrize(("n", "k"), GRID_CASES)
def test_blocked_knn_equals_the_plain_computation_bit_for_bit_with_ties(n, k):
    real, generated = grid_sets(n)
    expected_radii = reference_radii(real, k)
    expected = reference_precision_recall(real, generated, k)
    for block in blocks_for(n):
        radii = _knn_radii(_rows(real), k, block).numpy()
        assert np.array_equal(radii, expected_radii), block
        assert precision_recall(real, generated, k, block=block) == expected, block


@pytest.mark.parametrize(("n", "k", "dim"), [(30, 1, 2), (130, 3, 64), (61, 5, 300)])
def test_blocked_knn_matches_the_plain_computation_on_continuous_data(n, k, dim):
    """Not bit for bit here: q·s comes from a matrix product, and a BLAS adds its d terms in an
    order that can depend on the matrices' shapes (a 1-row block can take another kernel than an
    N-row one; numpy's BLAS is not torch's), so distances differ by a few ulps. The radii agree
    to 1e-12, and no point lies that close to a radius, so the shares agree exactly."""
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(n, dim))
    generated = rng.normal(size=(n + 11, dim)) * 1.05
    expected_radii = reference_radii(real, k)
    expected = reference_precision_recall(real, generated, k)
    assert 0 < min(expected) and max(expected) < 1
    for block in blocks_for(n):
        radii = _knn_radii(_rows(real), k, block).numpy()
        np.testing.assert_allclose(radii, expected_radii, rtol=1e-12, err_msg=f"block {block}")
        # float32 inputs, as tensors or arrays, are widened to float64 before any arithmetic
        real32, generated32 = real.astype(np.float32), generated.astype(np.float32)
        assert precision_recall(torch.from_numpy(real32), generated32, k, block=block) == (
            reference_precision_recall(real32.astype(np.float64), generated32.astype(np.float64), k)
        )
        assert precision_recall(real, generated, k, block=block, device="cpu") == expected


def test_a_point_on_the_radius_counts_as_inside():
    # k = 1: every real point of 0, 1, 2, 3 has radius 1. Generated 4 and −1 lie exactly 1 from
    # a real point (inside), 4.5 and −1.25 further (outside): precision 1/2. The generated
    # radii are 1/4 (−1.25, −1) and 1/2 (4, 4.5), which no real point is within: recall 0.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    generated = np.array([[4.0], [4.5], [-1.0], [-1.25]])
    for block in (1, 3, None):
        assert precision_recall(real, generated, k=1, block=block) == (0.5, 0.0)


def test_default_block_fits_the_memory_budget(monkeypatch):
    budget = 10_000
    monkeypatch.setattr(distribution, "DISTANCE_BLOCK_BYTES", budget)
    points = _rows(np.random.default_rng(0).normal(size=(301, 4)))
    shapes = []

    def keep(d: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(d.shape))
        return d.clone()

    distances = _per_query(points, points, None, keep)
    # 10,000 // (301 points × 8 bytes of float64) = 4 rows a block
    assert shapes == [(4, 301)] * 75 + [(1, 301)]
    assert 4 * 301 * 8 <= budget
    torch.testing.assert_close(distances, torch.cdist(points, points) ** 2, rtol=0, atol=1e-12)


def test_precision_recall_rejects_bad_input():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="block must be at least 1"):
        precision_recall(x, x, block=0)
    with pytest.raises(ValueError, match="different dimensions: 2 vs 3"):
        precision_recall(x, np.zeros((10, 3)))
    with pytest.raises(ValueError, match="needs more than 3 points"):
        precision_recall(x[:3], x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_precision_recall_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    real, generated = torch.randn(3000, 64, generator=g), torch.randn(2500, 64, generator=g) + 0.2
    expected = precision_recall(real, generated)
    assert precision_recall(real.cuda(), generated.cuda(), block=500) == expected
    assert precision_recall(real, generated, device="cuda") == expected
    radii = _knn_radii(_rows(real, "cuda"), 3, 700).cpu()
    torch.testing.assert_close(radii, _knn_radii(_rows(real), 3, None), rtol=1e-12, atol=0)


def features_with_offset(seed: int, n: int = 1000, dim: int = 5) -> np.ndarray:
    """Mean ≈ 1000, spread ≈ 1: Σ x xᵀ − n μμᵀ loses ≈ 6 digits to cancellation here (3.5e-10
    relative error on the covariance for seed 0), so a 1e-12 check tells the merges apart."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)) * rng.uniform(0.5, 3.0, size=dim) + 1e3


def assert_close_relative(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-12) -> None:
    assert np.abs(actual - expected).max() <= rel * np.abs(expected).max()


@pytest.mark.parametrize("seed", range(5))
def test_moments_merged_from_any_split_in_any_order_equal_numpy(seed):
    x = features_with_offset(seed)
    rng = np.random.default_rng(100 + seed)
    # random cuts, some pieces empty or of one row
    cuts = np.sort(np.concatenate([rng.integers(0, len(x), size=12), [3, 3, 4]]))
    pieces = [GaussianMoments.of(piece) for piece in np.split(x, cuts)]
    assert {0, 1} <= {p.count for p in pieces}
    # merged as a random binary tree: any two partial results combine
    while len(pieces) > 1:
        i, j = rng.choice(len(pieces), size=2, replace=False)
        merged = pieces[i].merge(pieces[j])
        pieces = [p for index, p in enumerate(pieces) if index not in (i, j)] + [merged]
    (tree,) = pieces
    # and folded in batch by batch, as a worker does, from the other end
    folded = functools.reduce(GaussianMoments.update, np.split(x[::-1], cuts), GaussianMoments.empty(x.shape[1]))
    for moments in (tree, folded):
        assert moments.count == len(x)
        assert_close_relative(moments.mean, np.mean(x, 0))
        assert_close_relative(moments.covariance, np.cov(x, rowvar=False))


def test_gaussian_statistics_equal_numpy_and_the_merged_moments():
    x = features_with_offset(7)
    mean, covariance = gaussian_statistics(torch.from_numpy(x).reshape(len(x), 5, 1))
    assert_close_relative(mean, np.mean(x, 0))
    assert_close_relative(covariance, np.cov(x, rowvar=False))
    halves = GaussianMoments.of(x[:400]).merge(GaussianMoments.of(x[400:]))
    assert_close_relative(halves.covariance, covariance)
    with pytest.raises(ValueError, match="at least two feature vectors"):
        gaussian_statistics(x[:1])


def test_moments_round_trip_through_plain_arrays():
    moments = GaussianMoments.of(features_with_offset(8)[:37]).update(np.ones((2, 5)))
    arrays = moments.to_arrays()
    assert {name: (a.dtype, a.shape) for name, a in arrays.items()} == {
        "count": (np.int64, ()),
        "mean": (np.float64, (5,)),
        "scatter": (np.float64, (5, 5)),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    back = GaussianMoments.from_arrays(np.load(buffer))
    assert back.count == 39
    assert np.array_equal(back.mean, moments.mean) and np.array_equal(back.scatter, moments.scatter)
    with pytest.raises(ValueError, match="'scatter' must be 5 × 5"):
        GaussianMoments.from_arrays({**arrays, "scatter": np.zeros((5, 4))})
    with pytest.raises(ValueError, match="'count' must be one non-negative integer"):
        GaussianMoments.from_arrays({**arrays, "count": np.array(2.5)})
    with pytest.raises(ValueError, match="different dimensions: 5 vs 3"):
        moments.merge(GaussianMoments.empty(3))
