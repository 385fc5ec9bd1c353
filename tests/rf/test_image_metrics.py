import hashlib
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from rf.metrics.images import extract_features, fid, inception_score, kid
from rf.metrics.inception import InceptionV3, inception_hash, load_inception


class _Exploit:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _random_inception(seed=0):
    """Random weights that keep activations alive (He-normal convs, BN stats near identity)."""
    generator = torch.Generator().manual_seed(seed)
    model = InceptionV3()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:
                tensor.copy_(
                    0.1 * torch.randn(tensor.shape, generator=generator) + (1.0 if name.endswith("bn.weight") else 0.0)
                )
    return model


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    model = _random_inception()
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_inception_round_trip_gives_identical_features(inception_file):
    model, path = inception_file
    generator = torch.Generator().manual_seed(1)
    grey = torch.rand(1, 1, 24, 40, generator=generator) * 2 - 1
    colour = torch.rand(1, 3, 24, 40, generator=generator) * 2 - 1
    with torch.inference_mode():
        expected_features, expected_logits = model(torch.cat([grey.expand(-1, 3, -1, -1), colour]))
    assert expected_features.shape == (2, 2048) and expected_logits.shape == (2, 1008)
    assert expected_features.std(0).mean() > 1e-3  # the random network is not degenerate
    loaded = load_inception(path)
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # an iterable of batches; a grey image is its channel repeated three times
    features, logits = extract_features(loaded, [grey, colour])
    torch.testing.assert_close(features, expected_features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert inception_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_inception_loads_a_pth_state_dict_with_weights_only(inception_file, tmp_path):
    model, _ = inception_file
    path = tmp_path / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    loaded = load_inception(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_inception_load_errors_name_the_path_and_keys(inception_file, tmp_path):
    model, path = inception_file
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_inception(tmp_path / "nowhere.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_inception(truncated)

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["extra.weight"] = state.pop("fc.weight")
    state["fc.bias"] = torch.zeros(1000)
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong))
    with pytest.raises(ValueError) as info:
        load_inception(wrong)
    message = str(info.value)
    assert "wrong.safetensors" in message
    assert "missing keys: fc.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "fc.bias (1000,) (expected (1008,))" in message


@pytest.mark.parametrize("name", ["exploit.pth", "exploit.safetensors"])
def test_inception_refuses_a_pickle_without_running_it(tmp_path, name):
    marker = tmp_path / "marker"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"fc.weight": _Exploit(marker)}))
    with pytest.raises(ValueError, match=name):
        load_inception(path)
    assert not marker.exists()


# ------------------------------------------------------------------- scores from features


def test_fid_of_gaussian_samples_matches_the_analytic_frechet_distance():
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov1, cov2 = a1 @ a1.T / d + np.eye(d) * 0.5, a2 @ a2.T / d + np.eye(d) * 0.5
    x = rng.multivariate_normal(mu1, cov1, size=n)
    y = rng.multivariate_normal(mu2, cov2, size=n)
    root = scipy.linalg.sqrtm(scipy.linalg.sqrtm(cov1) @ cov2 @ scipy.linalg.sqrtm(cov1)).real
    analytic = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * root))
    assert fid(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(analytic, rel=0.02)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_inception_score_closed_forms():
    mean, std = inception_score(torch.zeros(100, 7), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    classes = 5
    logits = 100.0 * torch.nn.functional.one_hot(torch.arange(100) % classes, 1008).double()
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(5, 3), splits=10)


def _kid_brute_force(x, y):
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³ by explicit loops."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_brute_force_reference():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1.2, size=(12, 5))
    # one subset of the full size is a permutation of each set: the statistic is exactly MMD²
    mean, std = kid(x, y, subsets=1, subset_size=12, seed=3)
    assert mean == pytest.approx(_kid_brute_force(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    mean, std = kid(x, y, subsets=20, subset_size=200, seed=0)
    assert abs(mean) < 3 * std + 1e-3
    shifted_mean, shifted_std = kid(x, y + 0.5, subsets=20, subset_size=200, seed=0)
    assert shifted_mean > 10 * shifted_std > 0
    assert shifted_mean > mean
    assert kid(x, y, subsets=5, subset_size=50, seed=7) == kid(x, y, subsets=5, subset_size=50, seed=7)
