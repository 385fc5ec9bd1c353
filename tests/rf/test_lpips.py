import pytest
import torch
from safetensors.torch import save_file

from rf.lpips import LPIPS, LPIPSHuberLoss, LPIPSLoss, load_lpips, make_lpips_loss


def _random_weights(seed=0, negative=False):
    """A random LPIPS state dict in the file's key names, with positive linear weights."""
    torch.manual_seed(seed)
    state = LPIPS().state_dict()
    state = {k: v for k, v in state.items() if k not in ("shift", "scale")}
    for name, tensor in state.items():
        if name.startswith("lin"):
            state[name] = torch.rand(tensor.shape) + 0.1
            if negative:
                state[name][0, 0] = -1.0
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file(_random_weights(), str(path))
    return path


@pytest.fixture(scope="module")
def lpips(weights_file):
    return load_lpips(weights_file)


def _images(n=2, size=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


def test_lpips_is_a_distance_like_score(lpips):
    x, y = _images(seed=1), _images(seed=2)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d_xy, d_yx = lpips(x, y), lpips(y, x)
    assert d_xy.shape == (2,)
    torch.testing.assert_close(d_xy, d_yx)
    assert (d_xy > 0).all()


def test_lpips_grows_with_the_perturbation(lpips):
    x = _images(n=1, seed=3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    small = lpips(x, (x + 0.05 * noise).clamp(-1, 1))
    large = lpips(x, (x + 0.5 * noise).clamp(-1, 1))
    assert 0 < small.item() < large.item()


def test_gradient_reaches_the_input_and_not_the_weights(lpips):
    x = _images(n=2, size=16, seed=5).requires_grad_(True)
    loss = LPIPSLoss(lpips)(x, _images(n=2, size=16, seed=6))
    loss.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_grey_images_and_resize():
    state = _random_weights(seed=1)
    model = LPIPS(resize=16)
    model.load_state_dict(state, strict=False)
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    y = torch.rand(1, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(model(x, y), model(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="16"):
        LPIPS()(x, y)


def test_lpips_huber_loss_matches_its_formula(lpips):
    torch.manual_seed(7)
    x0, x1 = torch.randn(2, 3, 16, 16), _images(n=2, size=16, seed=8)
    t = torch.tensor([0.25, 0.8])
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    v, v_hat = x1 - x0, x1 - x0 + 0.1 * torch.randn(2, 3, 16, 16)
    loss = LPIPSHuberLoss(lpips)(v_hat, v, xt, t)
    d = 3 * 16 * 16
    c = 0.00054 * d
    huber = (torch.sqrt(((v_hat - v) ** 2).flatten(1).sum(1) + c * c) - c) / d
    x_hat = xt + (1 - t.view(-1, 1, 1, 1)) * v_hat
    torch.testing.assert_close(loss, t * huber + lpips(x_hat, x1), rtol=1e-5, atol=1e-6)
    assert torch.equal(LPIPSHuberLoss(lpips)(v, v, xt, t), torch.zeros(2))


def test_make_lpips_loss(weights_file):
    assert isinstance(make_lpips_loss(weights_file, "lpips", resize=None), LPIPSLoss)
    assert isinstance(make_lpips_loss(weights_file, "lpips_huber"), LPIPSHuberLoss)
    with pytest.raises(ValueError, match="variant"):
        make_lpips_loss(weights_file, "l1")


def test_missing_or_bad_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        make_lpips_loss(tmp_path / "absent.safetensors")
    state = _random_weights()
    del state["lin2.model.1.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial\.safetensors.*missing keys: lin2\.model\.1\.weight"):
        load_lpips(tmp_path / "partial.safetensors")
    save_file(_random_weights(negative=True), str(tmp_path / "negative.safetensors"))
    with pytest.raises(ValueError, match="negative"):
        load_lpips(tmp_path / "negative.safetensors")
