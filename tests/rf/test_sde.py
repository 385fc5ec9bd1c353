"""The marginal-preserving SDE sampler (rf.sde) and the ``sde`` kind of rf.solvers.Solver.

Reference problem: π0 = N(0, I), π1 = N(m, Σ) with a non-diagonal Σ. Along X_t = α X1 + β X0 the
marginal is Gaussian, X_t ~ N(α m, C_t) with C_t = α² Σ + β² I, and by linear-Gaussian
conditioning the exact velocity and score are

    v(x, t) = E[α̇ X1 + β̇ X0 | X_t = x] = α̇ m + (α̇ α Σ + β̇ β I) C_t⁻¹ (x − α m),
    ∇log p_t(x) = −C_t⁻¹ (x − α m).

Both are affine in x, so Euler–Maruyama maps Gaussians to Gaussians and its exact output moments
follow from a 2×2 recursion (``em_moments``): that isolates the O(1/N) discretisation bias from the
sampling error.
"""

import numpy as np
import pytest
import torch

from rf import sde
from rf.noise import STREAMS, noise
from rf.paths import StraightPath, SubVPPath, VPConstPath, VPPath
from rf.solvers import Solver, euler

M = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.5], [0.5, 0.6]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)
SAMPLES = 20_000
STEPS = 200
# Largest |EM moment − target| over the cases below at N = 200 steps, from em_moments: 0.014
# (straight σ = 0.5: 0.011, VP σ = 2: 0.014, constant-speed VP σ = 2: 0.0057); it halves with
# every doubling of N (weak order 1).
BIAS = 0.02
# Standard errors of n = 20 000 samples from N(m, Σ): mean_i: √(Σ_ii / n) ≤ 0.0071;
# covariance_ij: √((Σ_ii Σ_jj + Σ_ij²) / n) ≤ 0.010. Tolerance = 5 SE + BIAS (≤ 0.07 on Σ_00).
SE_MEAN = torch.sqrt(torch.diag(SIGMA) / SAMPLES)
SE_COV = torch.sqrt((torch.outer(torch.diag(SIGMA), torch.diag(SIGMA)) + SIGMA**2) / SAMPLES)
CASES = [(path, scale) for path in (StraightPath(), VPPath(), VPConstPath()) for scale in (0.5, 1.0, 2.0)]


def coefficients(path, t):
    c = path.coefficients(torch.tensor([t], dtype=torch.float64))
    return tuple(float(value[0]) for value in c)


def gaussian_velocity(path):
    """The exact velocity of the Gaussian-to-Gaussian problem along ``path``."""

    def velocity(x, t):
        assert bool((t == t[0]).all())
        alpha, beta, dalpha, dbeta = coefficients(path, float(t[0]))
        cov_t = alpha**2 * SIGMA + beta**2 * EYE
        gain = (dalpha * alpha * SIGMA + dbeta * beta * EYE) @ torch.linalg.inv(cov_t)
        return dalpha * M + (x - alpha * M) @ gain.T

    return velocity


def start(path, ids):
    """Samples of the t = 0 marginal N(α_0 m, C_0) (N(0, I) for the straight and constant-speed VP
    paths; the VP path has α_0 = e^(−5.025) ≠ 0, which the flow carries to an O(α_0) error at
    t = 1)."""
    alpha, beta, _, _ = coefficients(path, 0.0)
    chol = torch.linalg.cholesky(alpha**2 * SIGMA + beta**2 * EYE)
    z = noise(11, ids, (2,), stream=STREAMS.x0).double()
    return alpha * M + z @ chol.T


def em_moments(path, scale, steps, drift=sde.drift):
    """Exact mean and covariance of the Euler–Maruyama output from the exact t = 0 marginal:
    the drift is affine, d(x) = A x + c, so μ ← (I + hA)μ + hc, P ← (I + hA)P(I + hA)ᵀ + h g² I."""
    velocity = gaussian_velocity(path)
    alpha, beta, _, _ = coefficients(path, 0.0)
    mean, cov = alpha * M, alpha**2 * SIGMA + beta**2 * EYE
    points = torch.cat([torch.zeros(1, 2, dtype=torch.float64), EYE])
    h = 1.0 / steps
    for k in range(steps):
        t = k * h
        d = drift(path, points, velocity(points, torch.full((3,), t, dtype=torch.float64)), t, scale)
        step = EYE + h * (d[1:] - d[0]).T
        mean = step @ mean + h * d[0]
        cov = step @ cov @ step.T + h * sde.diffusion_squared(path, t, scale) * EYE
    return mean, cov


def moment_errors(x):
    """|sample mean − m| / SE and |sample covariance − Σ| per entry, and whether all are within
    5 SE + BIAS."""
    mean = x.mean(0)
    cov = torch.cov(x.T)
    ok = bool(((mean - M).abs() <= 5 * SE_MEAN + BIAS).all() and ((cov - SIGMA).abs() <= 5 * SE_COV + BIAS).all())
    return mean, cov, ok


def without_score(path, x, v, t, scale):
    """The deliberately wrong drift: noise g dW but no ½g²∇log p correction."""
    return v


@pytest.mark.parametrize("path", [StraightPath(), VPPath(), SubVPPath(), VPConstPath()], ids=repr)
def test_drift_is_velocity_plus_half_g2_times_the_gaussian_score(path):
    velocity = gaussian_velocity(path)
    x = torch.tensor([[0.3, -1.2], [2.0, 0.7], [-1.0, 0.0]], dtype=torch.float64)
    for t in (0.0, 0.3, 0.9, 0.999):
        alpha, beta, _, _ = coefficients(path, t)
        score = -(x - alpha * M) @ torch.linalg.inv(alpha**2 * SIGMA + beta**2 * EYE).T
        v = velocity(x, torch.full((3,), t, dtype=torch.float64))
        g2 = sde.diffusion_squared(path, t, 0.7)
        assert g2 > 0
        assert torch.allclose(sde.drift(path, x, v, t, 0.7), v + 0.5 * g2 * score, rtol=1e-9, atol=1e-9)


def test_noise_schedules():
    t = 0.25
    assert sde.diffusion_squared(StraightPath(), t, 1.5) == pytest.approx(1.5**2 * 2 * (1 - t))
    assert sde.diffusion_squared(StraightPath(), 1.0, 1.0) == 0.0
    # VP: the VP SDE's b(τ) = b_min + (b_max − b_min) τ at τ = 1 − t, i.e. 0.1 + 19.9 (1 − t)
    assert sde.diffusion_squared(VPPath(), t, 1.0) == pytest.approx(0.1 + 19.9 * (1 - t))
    alpha = coefficients(SubVPPath(), t)[0]
    assert sde.diffusion_squared(SubVPPath(), t, 1.0) == pytest.approx((0.1 + 19.9 * (1 - t)) * (1 - alpha**4))
    # constant-speed VP: g² = 2β = 2√(1 − t²), finite at t = 0 where the VP rule 2α̇/α = 2/t is not
    assert sde.diffusion_squared(VPConstPath(), t, 1.5) == pytest.approx(1.5**2 * 2 * np.sqrt(1 - t**2))
    assert sde.diffusion_squared(VPConstPath(), 0.0, 1.0) == pytest.approx(2.0)
    assert sde.diffusion_squared(VPConstPath(), 1.0, 1.0) == 0.0


def test_vp_const_drift_is_v_minus_sigma2_beta_times_x_minus_tv():
    """β D = 1 for α = t, β = √(1 − t²): the score is −(x − t v) and κ_t = σ² β_t."""
    x = torch.tensor([[0.3, -1.2], [2.0, 0.7]], dtype=torch.float64)
    v = torch.tensor([[1.1, 0.4], [-0.6, 2.5]], dtype=torch.float64)
    for t in (0.0, 0.5, 0.99):
        beta = np.sqrt(1 - t**2)
        expected = v - 0.7**2 * beta * (x - t * v)
        assert torch.allclose(sde.drift(VPConstPath(), x, v, t, 0.7), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path,scale", CASES, ids=lambda p: repr(p))
def test_em_moments_have_first_order_bias_and_need_the_score(path, scale):
    mean, cov = em_moments(path, scale, STEPS)
    bias = max(float((mean - M).abs().max()), float((cov - SIGMA).abs().max()))
    assert bias <= BIAS
    mean4, cov4 = em_moments(path, scale, 4 * STEPS)
    bias4 = max(float((mean4 - M).abs().max()), float((cov4 - SIGMA).abs().max()))
    assert bias4 < 0.3 * bias  # O(1/N): four times the steps, about a quarter of the bias
    wrong_mean, wrong_cov = em_moments(path, scale, STEPS, drift=without_score)
    assert float((wrong_cov - SIGMA).abs().max()) > 0.2


@pytest.mark.parametrize("path,scale", CASES, ids=lambda p: repr(p))
def test_sde_samples_have_the_target_moments_and_the_wrong_drift_does_not(path, scale, monkeypatch):
    ids = np.arange(SAMPLES)
    x0 = start(path, ids)
    out = sde.euler_maruyama(gaussian_velocity(path), x0, STEPS, path=path, scale=scale, seed=3, ids=ids)
    mean, cov, ok = moment_errors(out.x)
    assert ok, (mean, cov)
    if scale != 1.0:
        return
    # The same sampler and noise with the score correction dropped inflates the covariance
    # (by ≈ 1.5 straight and constant-speed VP, ≈ 10 VP, per em_moments) and must fail the same
    # tolerance.
    monkeypatch.setattr(sde, "drift", without_score)
    wrong = sde.euler_maruyama(gaussian_velocity(path), x0, STEPS, path=path, scale=scale, seed=3, ids=ids)
    mean, cov, ok = moment_errors(wrong.x)
    assert not ok, (mean, cov)


def cubic(x, t):
    """A nonlinear field of element-wise +, −, × only: the same bits for a sample in any batch."""
    a, b = x[:, 0], x[:, 1]
    tt = t.to(x.dtype)
    return torch.stack([-b + 0.5 * tt * a - 0.1 * a**3, a - 0.2 * b + tt], 1)


@pytest.mark.parametrize("path", [StraightPath(), VPPath(), VPConstPath()], ids=repr)
def test_zero_scale_is_euler_bit_for_bit(path):
    x0 = noise(0, np.arange(64), (2,))
    reference = euler(cubic, x0, 25, return_trajectory=True)
    out = sde.euler_maruyama(cubic, x0, 25, path=path, scale=0.0, return_trajectory=True)
    assert torch.equal(out.x, reference.x)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(out.trajectory, reference.trajectory)
    )
    assert torch.equal(Solver.parse("sde@25:0").solve(cubic, x0, path=path).x, reference.x)


@pytest.mark.parametrize("path", [StraightPath(), VPPath()], ids=repr)
def test_a_sample_does_not_depend_on_its_batch(path):
    ids = np.arange(100)
    x0 = noise(4, ids, (2,))
    whole = sde.euler_maruyama(cubic, x0, 30, path=path, scale=0.8, seed=9, ids=ids)
    subset = np.array([3, 17, 42, 99, 0])
    part = sde.euler_maruyama(cubic, x0[subset], 30, path=path, scale=0.8, seed=9, ids=subset)
    assert torch.equal(part.x, whole.x[subset])
    solver = Solver.parse("sde@30:0.8")
    assert torch.equal(solver.solve(cubic, x0[subset], path=path, seed=9, ids=subset).x, whole.x[subset])
    # the noise matters: another seed moves the samples
    assert not torch.equal(sde.euler_maruyama(cubic, x0, 30, path=path, scale=0.8, seed=10, ids=ids).x, whole.x)


def test_noise_callable_matches_the_seeded_draws():
    ids = np.arange(10, 20)
    x0 = noise(1, ids, (3,))
    field = lambda x, t: -x  # noqa: E731
    seeded = sde.euler_maruyama(field, x0, 8, seed=5, ids=ids)
    given = sde.euler_maruyama(field, x0, 8, noise=lambda k: noise(5, ids, (3,), stream=STREAMS.sde_step(k)))
    assert torch.equal(seeded.x, given.x)
    with pytest.raises(ValueError):
        sde.euler_maruyama(field, x0, 8, noise=lambda k: torch.zeros_like(x0), ids=ids)
    with pytest.raises(ValueError):
        sde.euler_maruyama(field, x0, 8, noise=lambda k: torch.zeros(3))
    with pytest.raises(ValueError):
        sde.euler_maruyama(field, x0, 8, ids=np.arange(3))


def test_nfe_and_trajectory():
    x0 = torch.zeros(7, 2)
    out = sde.euler_maruyama(lambda x, t: torch.ones_like(x), x0, 13, return_trajectory=True)
    assert out.nfe.dtype == torch.int64 and out.nfe.tolist() == [13] * 7
    assert len(out.trajectory) == 14
    assert torch.allclose(out.trajectory[-1][0], torch.ones(7))
    assert torch.isfinite(out.x).all()
    assert Solver.parse("sde@9:2").solve(lambda x, t: x, x0, path=VPPath()).nfe.tolist() == [9] * 7
    for bad in ({"steps": 0}, {"steps": 3, "scale": -1.0}, {"steps": 3, "t1": 1.5}):
        with pytest.raises(ValueError):
            sde.euler_maruyama(lambda x, t: x, x0, **bad)


def test_solver_spec_round_trip_and_bad_specs():
    assert Solver.parse("sde@2000") == Solver("sde", steps=2000, scale=1.0)
    assert Solver.parse("sde@2000:0.5") == Solver("sde", steps=2000, scale=0.5)
    for text in ("sde@2000", "sde@2000:0.5", "sde@10:2", "sde@3:0", "sde@5:0.123456789", "sde@4:1e-07"):
        solver = Solver.parse(text)
        assert Solver.parse(solver.name) == solver
    assert Solver.parse("sde@2000:0.5").name == "sde@2000:0.5"
    assert Solver.parse("sde@2000:1").name == "sde@2000"
    for bad in (
        "sde",
        "sde@",
        "sde@0",
        "sde@1.5",
        "sde@5:",
        "sde@5:-1",
        "sde@5:nan",
        "sde@5:1e999",
        "euler@5:0.5",
        "rk45@1e-5:2",
        "sde@5:0.5:1",
    ):
        with pytest.raises(ValueError):
            Solver.parse(bad)
    with pytest.raises(ValueError):
        Solver("euler", steps=3, scale=0.5)
    # the ODE kinds accept and ignore the sde arguments
    x0 = torch.ones(4, 2)
    plain = Solver.parse("heun@3").solve(cubic, x0)
    assert torch.equal(Solver.parse("heun@3").solve(cubic, x0, path=VPPath(), seed=4, ids=[5, 6, 7, 8]).x, plain.x)
