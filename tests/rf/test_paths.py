import math

import pytest
import torch

from rf.losses import PseudoHuber, l2, make_loss, velocity_loss
from rf.paths import StraightPath, SubVPPath, VPConstPath, VPPath, make_path
from rf.timesteps import GridTime, LogitNormalTime, UniformTime, UShapedTime, make_time_sampler


def test_straight_path_interpolates_and_targets_the_chord():
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt, v = StraightPath().sample(x0, x1, t)
    assert torch.allclose(xt, t[:, None] * x1 + (1 - t[:, None]) * x0)
    assert torch.allclose(v, x1 - x0)


@pytest.mark.parametrize("path_cls", [VPPath, SubVPPath])
def test_vp_family_boundary_values(path_cls):
    path = path_cls()
    alpha0 = math.exp(-0.25 * 19.9 - 0.5 * 0.1)
    c = path.coefficients(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert c.alpha[0].item() == pytest.approx(alpha0, rel=1e-12)
    assert c.alpha[1].item() == pytest.approx(1.0)
    expected_beta0 = math.sqrt(1 - alpha0**2) if path_cls is VPPath else 1 - alpha0**2
    assert c.beta[0].item() == pytest.approx(expected_beta0, rel=1e-12)
    if path_cls is SubVPPath:
        assert c.beta[1].item() == pytest.approx(0.0, abs=1e-12)
        assert torch.isfinite(c.dbeta).all()


def test_vp_const_is_variance_preserving_at_constant_speed():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    c = VPConstPath().coefficients(t)
    assert c.alpha[0].item() == 0.0 and c.beta[0].item() == 1.0
    assert c.alpha[-1].item() == 1.0 and c.beta[-1].item() == 0.0
    assert torch.allclose(c.alpha**2 + c.beta**2, torch.ones_like(t), rtol=0, atol=1e-15)
    assert torch.equal(c.alpha, t) and torch.equal(c.dalpha, torch.ones_like(t))
    inner = slice(0, -1)  # β̇ = −t/√(1 − t²) is −∞ at t = 1
    assert torch.allclose(c.dbeta[inner], -t[inner] / torch.sqrt(1 - t[inner] ** 2), rtol=1e-14, atol=0)
    # D = α̇β − αβ̇ = 1/β, the identity rf.sde's schedule for this path rests on
    d = c.dalpha * c.beta - c.alpha * c.dbeta
    assert torch.allclose(d[inner] * c.beta[inner], torch.ones(100, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", [StraightPath(), VPPath(), SubVPPath(), VPConstPath()], ids=repr)
def test_velocity_is_the_time_derivative(path):
    x0, x1 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    h = 1e-6
    forward, _ = path.sample(x0, x1, t + h)
    backward, _ = path.sample(x0, x1, t - h)
    _, v = path.sample(x0, x1, t)
    assert torch.allclose((forward - backward) / (2 * h), v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", [VPPath(), VPConstPath()], ids=repr)
def test_vp_paths_stop_below_their_singular_end(path):
    assert path.t_max < 1.0
    assert torch.isinf(path.coefficients(torch.tensor([1.0])).dbeta).all()
    assert torch.isfinite(path.coefficients(torch.tensor([path.t_max])).dbeta).all()


def test_vp_const_cut_off_is_where_its_docstring_says():
    c = VPConstPath().coefficients(torch.tensor([VPConstPath().t_max], dtype=torch.float64))
    assert c.beta.item() == pytest.approx(0.0447, abs=1e-4)  # the noise left at t_max
    assert c.dbeta.item() == pytest.approx(-22.34, abs=0.01)  # the largest noise weight trained on
    assert VPConstPath().t_max == VPPath().t_max


def test_make_path_names():
    assert isinstance(make_path("subvp"), SubVPPath)
    assert isinstance(make_path("vp_const"), VPConstPath)
    with pytest.raises(ValueError, match="unknown path 'vpp'"):
        make_path("vpp")


def test_loss_is_zero_for_true_velocity_of_a_deterministic_coupling():
    x0 = torch.randn(64, 2)
    x1 = 2 * x0 + 1  # a deterministic coupling x1 = f(x0) with a straight interpolation

    class TrueVelocity(torch.nn.Module):
        def forward(self, x, t):
            # On X_t = t(2x0+1) + (1−t)x0 = (1+t)x0 + t, x0 = (X_t − t)/(1 + t), velocity x0 + 1.
            return (x - t[:, None]) / (1 + t[:, None]) + 1

    t = UniformTime().sample(64, torch.Generator().manual_seed(0))
    assert velocity_loss(TrueVelocity(), StraightPath(), x0, x1, t).item() < 1e-10
    assert velocity_loss(lambda x, t: torch.zeros_like(x), StraightPath(), x0, x1, t).item() > 0.5


def test_pseudo_huber_limits():
    pred = torch.zeros(2, 100, dtype=torch.float64)
    target = torch.zeros(2, 100, dtype=torch.float64)
    target[0, 0] = 1e-5
    target[1, 0] = 10.0
    loss = PseudoHuber(c=0.01)(pred, target)
    assert loss[0].item() == pytest.approx(1e-10 / (2 * 0.01), rel=1e-3)  # quadratic near 0
    assert loss[1].item() == pytest.approx(10.0 - 0.01, rel=1e-4)  # linear far away
    assert l2(pred, target)[1].item() == pytest.approx(100 / 100)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("l1")


def test_time_samplers_ranges_and_shapes():
    g = torch.Generator().manual_seed(0)
    for sampler in (UniformTime(eps=0.01), LogitNormalTime(), UShapedTime()):
        t = sampler.sample(20000, g, t_max=0.99)
        assert t.min() >= sampler.eps and t.max() <= 0.99
    u_shaped = UShapedTime(a=4).sample(50000, g)
    middle = ((u_shaped > 0.4) & (u_shaped < 0.6)).float().mean().item()
    ends = (u_shaped < 0.1).float().mean().item()
    # density ∝ cosh(4(s − ½)): mass of (0.4, 0.6) is sinh(0.4)/sinh(2) ≈ 0.113, of (0, 0.1) ≈ 0.247
    assert middle == pytest.approx(math.sinh(0.4) / math.sinh(2), abs=0.01)
    assert ends == pytest.approx((math.sinh(2) - math.sinh(1.6)) / (2 * math.sinh(2)), abs=0.01)
    logit = LogitNormalTime(eps=0.0).sample(50000, g)
    assert logit.median().item() == pytest.approx(0.5, abs=0.01)


def test_grid_time_is_the_distillation_schedule():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    assert torch.all(GridTime(1).from_uniform(u) == 0)
    t = GridTime(4).from_uniform(u)
    assert set(t.tolist()) == {0.0, 0.25, 0.5, 0.75}
    assert make_time_sampler("grid", k=2).k == 2
    with pytest.raises(ValueError, match="unknown time sampler"):
        make_time_sampler("beta")
