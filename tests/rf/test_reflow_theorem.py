"""The reflow theorem on the seed talk's toy, with ``rf`` alone.

Theorem (Liu, Gong & Liu, ICLR 2023, Thm. 3.5): for every convex cost c, the rectified coupling
(Z0, Z1) = Rectify((X0, X1)) has E c(Z1 − Z0) ≤ E c(X1 − X0). Reflow applies it round after
round, so the couplings of random pairing → 1-RF → 2-RF → 3-RF have non-increasing costs.

Learnt flows only approximate the rectified flow, and the costs are estimated from samples; the
property tested is the paper's claim as far as a finite sample can check it: **the cost of round
k + 1 exceeds round k's by no more than sampling error**. Each round's cost is the mean of M
i.i.d. values c(Z1_i − Z0_i) on its own fresh draws Z0_i (different seeds per round), so two
rounds' estimates are independent and their difference has standard error
√(s_k² / M + s_{k+1}² / M), with s the sample standard deviations. The tolerance is
:data:`Z` = 3 such standard errors (a one-sided normal test at 0.13 % per comparison when the
true costs are equal) — derived from the samples, not tuned. The same standard errors show the
check has power: the first rectification lowers every cost by many of them, so a round that
undid it (trained, say, on shuffled pairs) would fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from rf.coupling import generate_pairs
from rf.models import MLPVelocity
from rf.noise import STREAMS, uniform
from rf.paths import StraightPath
from rf.solvers import Solver
from rf.timesteps import UniformTime
from rf.toy import three_gaussians
from rf.training import VelocityTrainer

PI0, PI1 = three_gaussians(-10.0), three_gaussians(10.0)
ROUNDS = 3
STEPS, BATCH, PAIRS = 3000, 256, 10_000
M = 5000
"""Fresh draws Z0 per round on which its coupling's cost is estimated."""
Z = 3.0
"""Standard errors of the difference of two rounds' estimated costs allowed as sampling error."""
SOLVER = Solver.parse("rk45@1e-5")
SEED_PI0, SEED_PI1, SEED_TIME, SEED_PAIRS, SEED_EVAL = 1, 2, 3, 10, 100
COSTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "norm": lambda d: np.linalg.norm(d, axis=1),  # the transport cost E‖Z1 − Z0‖
    "squared norm": lambda d: np.sum(d**2, axis=1),
    "vertical displacement": lambda d: np.abs(d[:, 1]),  # |e_y · (Z1 − Z0)|: convex, not a norm of Z1 − Z0
}


def _train(model: MLPVelocity, x0_of: Callable, x1_of: Callable) -> MLPVelocity:
    """``STEPS`` steps on pairs addressed by example id; returns the EMA model in eval mode."""
    trainer = VelocityTrainer(model, StraightPath(), lr=1e-3, warmup_steps=100, ema_decay=0.99)
    sampler = UniformTime()
    for step in range(STEPS):
        ids = np.arange(step * BATCH, (step + 1) * BATCH)
        trainer.step(x0_of(ids), x1_of(ids), sampler.from_uniform(uniform(SEED_TIME, ids, stream=STREAMS.time)))
    return trainer.ema.model.eval()


def _flow(model: MLPVelocity, x0: torch.Tensor) -> torch.Tensor:
    return generate_pairs(model, SOLVER, x0).x1


@pytest.fixture(scope="module")
def displacements() -> list[np.ndarray]:
    """Z1 − Z0 of M fresh pairs of each round's coupling: round 0 the independent pairing
    (X0 ⫫ X1), round k the flow of k-RF from Z0 ~ π0 (round k trained on round k − 1's pairs).
    One intra-op thread, as the function-scoped ``single_thread`` fixture would give (it starts
    after a module fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rounds()
    finally:
        torch.set_num_threads(threads)


def _rounds() -> list[np.ndarray]:
    torch.manual_seed(0)
    ids = np.arange(M)
    x0, x1 = PI0.sample(SEED_EVAL, ids), PI1.sample(SEED_EVAL + 1, ids)
    rounds = [(x1 - x0).double().numpy()]
    x0_of, x1_of = (lambda i: PI0.sample(SEED_PI0, i)), (lambda i: PI1.sample(SEED_PI1, i))
    model = MLPVelocity(dim=2, width=256, depth=3)
    for k in range(1, ROUNDS + 1):
        model = _train(model, x0_of, x1_of)
        z0 = PI0.sample(SEED_EVAL + 2 * k, ids)  # fresh draws: independent of the other rounds'
        rounds.append((_flow(model, z0) - z0).double().numpy())
        pair_x0 = PI0.sample(SEED_PAIRS + k, np.arange(PAIRS))
        pair_x1 = _flow(model, pair_x0)
        x0_of, x1_of = (lambda i, x=pair_x0: x[i % PAIRS]), (lambda i, x=pair_x1: x[i % PAIRS])
        warm = MLPVelocity(**model.config())
        warm.load_state_dict(model.state_dict())
        model = warm
    return rounds


def _mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """The sample mean and its standard error s / √M."""
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


@pytest.mark.parametrize("cost", sorted(COSTS))
def test_reflow_does_not_increase_a_convex_cost_beyond_sampling_error(displacements, cost):
    estimates = [_mean_and_error(COSTS[cost](d)) for d in displacements]
    for k in range(ROUNDS):
        (before, error_before), (after, error_after) = estimates[k], estimates[k + 1]
        error = math.hypot(error_before, error_after)
        assert after - before <= Z * error, (
            f"{cost}: round {k + 1} costs {after:.5f}, round {k} {before:.5f}: up by {after - before:.5f} "
            f"> {Z} standard errors ({error:.5f}); all rounds: {estimates}"
        )


@pytest.mark.parametrize("cost", sorted(COSTS))
def test_the_first_rectification_lowers_the_cost_by_many_standard_errors(displacements, cost):
    """The check has power: random pairing → 1-RF is a decrease far beyond the tolerance."""
    (independent, error_0), (rectified, error_1) = (_mean_and_error(COSTS[cost](d)) for d in displacements[:2])
    assert independent - rectified > 10 * Z * math.hypot(error_0, error_1), (cost, independent, rectified)
