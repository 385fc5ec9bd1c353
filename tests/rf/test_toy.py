import numpy as np
import pytest
import torch

from rf.toy import Checkerboard, EightGaussians, GaussianMixture, Moons, make_toy, three_gaussians


def test_mixture_moments_and_weights():
    mix = GaussianMixture([[-5.0, 0.0], [5.0, 0.0]], scales=[0.5, 1.0], weights=[1, 3])
    x = mix.sample_n(40000, seed=1)
    right = x[:, 0] > 0
    # weight 3/4 on the right component: sd of the share is 0.0022
    assert right.float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert x[right, 1].std().item() == pytest.approx(1.0, abs=0.02)
    assert x[~right, 1].std().item() == pytest.approx(0.5, abs=0.02)
    assert x[right, 0].mean().item() == pytest.approx(5.0, abs=0.03)


def test_samples_are_pure_functions_of_seed_and_id():
    for dist in (three_gaussians(10), EightGaussians(), Moons(), Checkerboard()):
        ids = np.arange(500)
        whole = dist.sample(3, ids)
        assert torch.equal(torch.cat([dist.sample(3, ids[:123]), dist.sample(3, ids[123:])]), whole)
        assert not torch.equal(dist.sample(4, ids), whole)
        assert whole.shape == (500, 2) and torch.isfinite(whole).all()


def test_checkerboard_occupies_alternate_squares():
    x = Checkerboard(size=4.0).sample_n(20000)
    cells = torch.floor(x).long()
    parity = (cells[:, 0] + cells[:, 1]) % 2
    assert parity.unique().numel() == 1  # all points on squares of one colour
    assert x.abs().max() <= 2.0


def test_make_toy_errors():
    assert isinstance(make_toy("moons", noise_scale=0.05), Moons)
    with pytest.raises(ValueError, match="unknown toy distribution 'spiral'"):
        make_toy("spiral")
    with pytest.raises(ValueError, match="bad options for toy distribution"):
        make_toy("moons", radius=3)
    with pytest.raises(ValueError, match="one scale and one weight"):
        GaussianMixture([[0, 0], [1, 1]], scales=[1.0])
