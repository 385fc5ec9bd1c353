import itertools

import numpy as np
import pytest
import torch

from rf.metrics import (
    crossing_rate,
    exact_ot_cost,
    frechet_distance,
    frechet_distance_of_features,
    mmd2,
    pairing_ratio,
    precision_recall,
    straightness,
    straightness_per_sample,
    transport_cost,
    wasserstein2,
)
from rf.solvers import euler, rk45


def test_crossing_rate_on_hand_built_segments():
    # an X (crossing), a parallel segment far away, and one touching nothing
    x0 = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 0.0], [10.0, 10.0]])
    x1 = torch.tensor([[1.0, 1.0], [1.0, 0.0], [6.0, 0.0], [11.0, 12.0]])
    # 6 pairs of segments, exactly one crosses
    assert crossing_rate(x0, x1) == pytest.approx(1 / 6)
    assert crossing_rate(x0[[0, 2, 3]], x1[[0, 2, 3]]) == 0.0
    with pytest.raises(ValueError, match="2D"):
        crossing_rate(torch.zeros(3, 3), torch.ones(3, 3))


def test_crossing_rate_chunking_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(60, 2, generator=g), torch.randn(60, 2, generator=g)
    expected = crossing_rate(x0, x1, chunk=1000)
    assert crossing_rate(x0, x1, chunk=7) == expected
    assert 0 < expected < 1


def test_ot_cost_equals_brute_force_on_tiny_sets():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    for power in (1.0, 2.0):
        best = min(
            np.mean([torch.linalg.norm(x[i] - y[p[i]]).item() ** power for i in range(6)])
            for p in itertools.permutations(range(6))
        )
        assert exact_ot_cost(x, y, power) == pytest.approx(best, rel=1e-9)


def test_pairing_ratio_is_one_for_optimal_and_above_for_permuted():
    # on the line, the sorted (monotone) pairing is optimal for |x − y|
    g = torch.Generator().manual_seed(2)
    x = torch.sort(torch.randn(50, generator=g)).values[:, None] * torch.tensor([[1.0, 0.0]])
    y = torch.sort(torch.randn(50, generator=g) + 3).values[:, None] * torch.tensor([[1.0, 0.0]])
    assert pairing_ratio(x, y) == pytest.approx(1.0, abs=1e-9)
    assert pairing_ratio(x, y[torch.randperm(50, generator=g)]) > 1.0 + 1e-3


def test_w2_of_shifted_point_sets_is_the_shift():
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(3))
    shift = torch.tensor([3.0, 4.0])
    assert wasserstein2(x, x + shift) == pytest.approx(5.0, rel=1e-6)
    assert transport_cost(x, x + shift) == pytest.approx(5.0, rel=1e-6)
    assert transport_cost(x, x + shift, power=2) == pytest.approx(25.0, rel=1e-6)


def test_frechet_distance_closed_form_for_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    cov1, cov2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # commuting covariances: tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = Σ (σ1 − σ2)²
    expected = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200000, 2)) * [1, 2] + mu1
    b = rng.normal(size=(200000, 2)) * [3, 1] + mu2
    assert frechet_distance_of_features(a, b) == pytest.approx(expected, rel=0.02)


def test_mmd_separates_distributions():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g)
    c = torch.randn(300, 2, generator=g) + 1.5
    same, different = mmd2(a, b), mmd2(a, c)
    assert abs(same) < 0.02 and different > 0.2


def test_precision_recall_on_partial_support():
    g = torch.Generator().manual_seed(5)
    real = torch.randn(1000, 2, generator=g)
    covered = torch.randn(1000, 2, generator=g)
    assert min(precision_recall(real, covered)) > 0.9
    # generated points on one half only: precision high, recall about one half
    half = covered[covered[:, 0] > 0]
    precision, recall = precision_recall(real, half)
    assert precision > 0.9 and 0.35 < recall < 0.7
    far = covered + 20
    assert precision_recall(real, far) == (0.0, 0.0)


def test_straightness_zero_for_straight_paths_and_positive_for_curved():
    x0 = torch.randn(20, 2)
    straight = euler(lambda x, t: torch.ones_like(x), x0, 10, return_trajectory=True)
    assert straightness(straight.trajectory) == pytest.approx(0.0, abs=1e-10)
    # rotation by an angle π/2: the path is a quarter circle; S = ∫ ‖chord − v‖² dt > 0
    curved = euler(lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1) * (torch.pi / 2), x0, 200, return_trajectory=True)
    s = straightness(curved.trajectory)
    # closed form for the exact quarter rotation: E‖x0‖²·((π/2)² − 2) (speed (π/2)|x0|, chord √2|x0|)
    expected = (x0.pow(2).sum(1).mean() * ((torch.pi / 2) ** 2 - 2)).item()
    assert s == pytest.approx(expected, rel=0.02)


def test_straightness_per_sample_has_each_samples_closed_form_whatever_the_batch():
    """A quarter rotation moves x0 along a quarter circle: S_i = ‖x0_i‖²((π/2)² − 2). RK45 with
    per-sample steps leaves Δt = 0 intervals (rejected steps, finished samples), which add 0."""
    x0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def rotation(x, t):
        return torch.stack([-x[:, 1], x[:, 0]], 1) * (torch.pi / 2)

    solution = rk45(rotation, x0, rtol=1e-8, atol=1e-8, return_trajectory=True)
    per_sample = straightness_per_sample(solution.trajectory)
    expected = x0.pow(2).sum(1) * ((torch.pi / 2) ** 2 - 2)
    torch.testing.assert_close(per_sample, expected, rtol=0.02, atol=1e-6)
    assert straightness(solution.trajectory) == pytest.approx(float(per_sample.mean()), rel=1e-12)
    fixed = euler(rotation, x0, 50, return_trajectory=True).trajectory
    whole = straightness_per_sample(fixed)
    halves = [straightness_per_sample([(t[rows], z[rows]) for t, z in fixed]) for rows in (slice(0, 13), slice(13, 40))]
    assert torch.equal(torch.cat(halves), whole)
