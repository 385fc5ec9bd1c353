import numpy as np
import pytest
import torch

from rf.noise import noise, philox4x32, uniform


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        # Known-answer vectors of Random123's philox4x32_10 (kat_vectors).
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(np.array([counter], np.uint32), np.array([key], np.uint32))
    assert out[0].tolist() == expected


def test_noise_is_independent_of_batch_split():
    ids = np.arange(1000, 1500)
    whole = noise(7, ids, (3, 4))
    for size in (1, 13, 64, 499):
        parts = torch.cat([noise(7, ids[i : i + size], (3, 4)) for i in range(0, len(ids), size)])
        assert torch.equal(parts, whole)
    shuffled = np.random.default_rng(0).permutation(ids)
    assert torch.equal(noise(7, shuffled, (3, 4)), whole[shuffled - 1000])


def test_noise_depends_on_seed_stream_and_large_ids():
    ids = np.array([0, 1, 2**40 + 5])
    a = noise(1, ids, (8,))
    assert not torch.equal(a, noise(2, ids, (8,)))
    assert not torch.equal(a, noise(1, ids, (8,), stream=3))
    assert not torch.equal(a[0], a[1])
    assert torch.equal(noise(1, ids[2:], (8,)), a[2:])


def test_noise_is_standard_normal_and_uniform_is_uniform():
    z = noise(3, np.arange(20000), (5,)).double()
    # mean of 1e5 N(0,1) draws has sd 0.0032; 5 sd bounds.
    assert abs(z.mean().item()) < 0.016
    assert abs(z.var().item() - 1) < 0.02
    u = uniform(3, np.arange(100000)).double()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    # Kolmogorov–Smirnov against U(0, 1): critical value at alpha=1e-3 is 1.95/sqrt(n).
    sorted_u = torch.sort(u).values
    grid = torch.arange(1, len(u) + 1, dtype=torch.float64) / len(u)
    assert (sorted_u - grid).abs().max().item() < 1.95 / len(u) ** 0.5


def test_noise_rejects_bad_ids_and_seeds():
    with pytest.raises(ValueError, match="non-negative"):
        noise(0, np.array([-1]), (2,))
    with pytest.raises(ValueError, match="seed"):
        noise(-5, np.array([1]), (2,))
    with pytest.raises(ValueError, match="one-dimensional"):
        noise(0, np.zeros((2, 2), dtype=np.int64), (2,))
