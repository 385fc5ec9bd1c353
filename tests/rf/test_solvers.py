import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from rf.coupling import FixedShapeVelocity, generate_pairs
from rf.models import MLPVelocity
from rf.noise import noise
from rf.solvers import Solver, euler, heun, rk45, tree_sum


def nonlinear(x, t):
    """A nonlinear, time-dependent 2D field (a damped rotation with a cubic term)."""
    a, b = x[:, 0], x[:, 1]
    tt = t.to(x.dtype)
    return torch.stack([-b + 0.5 * torch.sin(3 * tt) * a - 0.1 * a**3, a - 0.2 * b + tt], 1)


def cubic(x, t):
    """A polynomial field: only +, −, × per element, so every sample gets the same bits in any batch."""
    a, b = x[:, 0], x[:, 1]
    tt = t.to(x.dtype)
    return torch.stack([-b + 0.5 * tt * a - 0.1 * a**3, a - 0.2 * b + tt], 1)


def test_rk45_matches_scipy_on_a_nonlinear_ode():
    x0 = torch.tensor([[1.0, 0.0], [-0.5, 2.0], [3.0, -1.0]], dtype=torch.float64)
    ours = rk45(nonlinear, x0, rtol=1e-9, atol=1e-9, t1=3.0)
    for i in range(len(x0)):

        def f(t, y):
            return nonlinear(torch.tensor(y)[None], torch.tensor([t]))[0].numpy()

        ref = solve_ivp(f, (0.0, 3.0), x0[i].numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
        assert np.allclose(ours.x[i].numpy(), ref.y[:, -1], atol=1e-7)
    assert (ours.nfe > 20).all()


def test_rk45_error_shrinks_with_tolerance_and_costs_more_nfe():
    x0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    exact = rk45(nonlinear, x0, rtol=1e-11, atol=1e-11, t1=2.0).x
    loose = rk45(nonlinear, x0, rtol=1e-3, atol=1e-3, t1=2.0)
    tight = rk45(nonlinear, x0, rtol=1e-7, atol=1e-7, t1=2.0)
    assert (tight.x - exact).abs().max() < (loose.x - exact).abs().max()
    assert tight.nfe.item() > loose.nfe.item()


def test_rk45_exact_on_linear_decay():
    x0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    out = rk45(lambda x, t: -x, x0, rtol=1e-8, atol=1e-8)
    assert torch.allclose(out.x, x0 * math.exp(-1), atol=1e-7)


def test_rk45_controls_the_error_per_sample():
    # The result alone and inside 256 others must be identical; a whole-batch error norm
    # would let the other samples choose this sample's steps.
    x = torch.randn(257, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    batched = rk45(cubic, x, rtol=1e-5, atol=1e-5)
    alone = rk45(cubic, x[100:101], rtol=1e-5, atol=1e-5)
    assert torch.equal(alone.x[0], batched.x[100])
    assert alone.nfe.item() == batched.nfe[100].item()
    assert batched.nfe.unique().numel() > 1  # samples take different numbers of steps


def test_rk45_is_batch_invariant_for_a_network():
    # A network's matrix kernels round differently for different batch sizes; evaluated in
    # fixed-shape chunks every sample gets the same bits, so alone == inside a batch of 256.
    torch.manual_seed(0)
    model = MLPVelocity(dim=2, width=64, depth=2).eval()
    velocity = FixedShapeVelocity(model, chunk=64)
    x = torch.randn(257, 2) * 3
    with torch.no_grad():
        batched = rk45(velocity, x, rtol=1e-5, atol=1e-5)
        alone = rk45(velocity, x[100:101], rtol=1e-5, atol=1e-5)
    assert torch.allclose(alone.x[0], batched.x[100], atol=1e-5, rtol=0)
    assert alone.nfe.item() == batched.nfe[100].item()


def test_pairs_are_bitwise_independent_of_batch_with_fixed_shape_evaluation():
    torch.manual_seed(0)
    model = MLPVelocity(dim=2, width=64, depth=2).eval()
    solver = Solver.parse("rk45@1e-4")
    ids = np.arange(300)
    whole = generate_pairs(model, solver, noise(5, ids, (2,)), chunk=32)
    parts = [generate_pairs(model, solver, noise(5, ids[i : i + 70], (2,)), chunk=32) for i in range(0, 300, 70)]
    assert torch.equal(torch.cat([p.x1 for p in parts]), whole.x1)
    assert torch.equal(torch.cat([p.nfe for p in parts]), whole.nfe)


def test_euler_is_exact_in_one_step_on_a_constant_field():
    x0 = torch.randn(10, 3)
    v = torch.tensor([1.0, -2.0, 0.5])
    out = euler(lambda x, t: v.expand_as(x), x0, steps=1)
    assert torch.equal(out.x, x0 + v)
    assert out.nfe.tolist() == [1] * 10


def test_heun_is_second_order():
    x0 = torch.tensor([[1.0]], dtype=torch.float64)

    def error(method, steps):
        return abs(method(lambda x, t: -x, x0, steps).x.item() - math.exp(-1))

    # halving the step divides the error by ~4 (Heun) and ~2 (Euler)
    assert error(heun, 20) / error(heun, 40) == pytest.approx(4, rel=0.05)
    assert error(euler, 20) / error(euler, 40) == pytest.approx(2, rel=0.05)
    assert heun(lambda x, t: -x, x0, 7).nfe.item() == 14


def test_trajectories_and_solver_names():
    x0 = torch.zeros(4, 2)
    out = euler(lambda x, t: torch.ones_like(x), x0, steps=5, return_trajectory=True)
    assert len(out.trajectory) == 6
    assert torch.allclose(out.trajectory[2][0], torch.full((4,), 0.4))
    adaptive = rk45(lambda x, t: torch.ones_like(x), x0, return_trajectory=True)
    assert torch.allclose(adaptive.trajectory[-1][0], torch.ones(4))
    assert Solver.parse("euler@100").name == "euler@100"
    assert Solver.parse("rk45@1e-5").tolerance == 1e-5
    for bad in ("euler", "euler@0", "rk4@3", "rk45@-1"):
        with pytest.raises(ValueError):
            Solver.parse(bad)


def test_tree_sum_equals_sum_and_ignores_batch():
    x = torch.randn(9, 3, 5, 7, dtype=torch.float64)
    assert torch.allclose(tree_sum(x), x.flatten(1).sum(1))
    assert torch.equal(tree_sum(x[4:5].float()), tree_sum(x.float())[4:5])


def test_fixed_shape_velocity_pads_and_trims():
    calls = []

    def model(x, t):
        calls.append(x.shape[0])
        return x * 2

    out = FixedShapeVelocity(model, chunk=8)(torch.ones(19, 2), torch.zeros(19))
    assert out.shape == (19, 2) and torch.all(out == 2)
    assert calls == [8, 8, 8]
