import hashlib

import numpy as np
import pytest
import torch

import rf.noise
from rf.noise import STREAMS, StreamFamily, Streams, noise, philox4x32, philox4x32_numpy, uniform

# Random123's philox4x32_10 known-answer vectors (kat_vectors).
KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert philox4x32(torch.tensor([counter]), torch.tensor([key]))[0].tolist() == expected
    assert philox4x32_numpy(np.array([counter], np.uint32), np.array([key], np.uint32))[0].tolist() == expected


def test_torch_philox_equals_the_numpy_reference_bit_for_bit():
    rng = np.random.default_rng(0)
    counter = rng.integers(0, 2**32, (4096, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, (4096, 2), dtype=np.uint64).astype(np.uint32)
    # the largest words (products near 2**64, sign bit of int64 set) and the 2**31 boundary
    edges = np.array([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF], np.uint32)
    grid = np.stack(np.meshgrid(edges, edges, edges, edges, indexing="ij"), -1).reshape(-1, 4)
    counter[: len(grid)] = grid
    key[: len(grid)] = grid[:, 1:3]
    counter[-1], key[-1] = 0xFFFFFFFF, 0xFFFFFFFF
    expected = philox4x32_numpy(counter, key).astype(np.int64)
    got = philox4x32(torch.from_numpy(counter.astype(np.int64)), torch.from_numpy(key.astype(np.int64)))
    assert got.dtype == torch.int64 and np.array_equal(got.numpy(), expected)
    # one key broadcast over all counters, as uniform() and noise() use it
    one_key = philox4x32(torch.from_numpy(counter.astype(np.int64)), torch.tensor([0xFFFFFFFF, 7]))
    assert np.array_equal(one_key.numpy(), philox4x32_numpy(counter, np.array([0xFFFFFFFF, 7], np.uint32)))


# Values of rf.noise before the torch path (NumPy Philox, float64 Box–Muller), frozen: stored
# couplings and test expectations depend on them. (seed, ids, shape, stream) → values.
FROZEN_UNIFORM = [
    (
        0,
        [0, 1, 2],
        (5,),
        0,
        [
            0.39904648065567017,
            0.880520224571228,
            0.7357127666473389,
            0.6054818630218506,
            0.972241222858429,
            0.4172481298446655,
            0.9146023988723755,
            0.4517265558242798,
            0.02846173569560051,
            0.4282393455505371,
            0.3476322293281555,
            0.0253894180059433,
            0.6686388850212097,
            0.708730936050415,
            0.7712745666503906,
        ],
    ),
    (
        2**40 + 3,
        [7, 2**33 + 1],
        (3,),
        3,
        [
            0.3368702828884125,
            0.649559736251831,
            0.9615955948829651,
            0.39069274067878723,
            0.06239837780594826,
            0.06906067579984665,
        ],
    ),
]
FROZEN_NOISE = [
    (
        7,
        [0, 5, 2**40 + 5],
        (2, 3),
        0,
        [
            0.0002915676450356841,
            -0.30484697222709656,
            1.78875732421875,
            1.0678725242614746,
            0.3764035105705261,
            -1.287011742591858,
            2.2877719402313232,
            0.912031352519989,
            -1.3560645580291748,
            2.6136059761047363,
            0.7079799175262451,
            0.8596070408821106,
            0.6217694878578186,
            0.08974912017583847,
            0.12334706634283066,
            1.559773564338684,
            0.6241227984428406,
            0.5789788961410522,
        ],
    ),
    (
        123,
        [1, 99],
        (5,),
        2**20 + 17,
        [
            0.05541124939918518,
            0.2363637387752533,
            -0.7108575701713562,
            -0.16654250025749207,
            1.3908747434616089,
            -0.05618667230010033,
            -0.6676403880119324,
            -1.131889820098877,
            0.4041088819503784,
            0.28269097208976746,
        ],
    ),
    (
        2**64 - 1,
        [2**63 - 1],
        (9,),
        2**32 - 1,
        [
            -0.7640348076820374,
            0.91338711977005,
            0.5658277869224548,
            -2.5437700748443604,
            -0.5938358306884766,
            0.5259988307952881,
            -0.3284183740615845,
            0.4719026982784271,
            -0.5244251489639282,
        ],
    ),
]
# sha256 of the float32 bytes of 196,608 values: noise(11, 1000…1063, (3, 32, 32)) and uniform(…, stream=2)
FROZEN_NOISE_SHA256 = "ccd72cec76240d948ba49a8b76f47f588299a8b358fa210c1e55cdb406f03131"
FROZEN_UNIFORM_SHA256 = "510fef6542187f8b0bc326dfa97967d2ef0e2ef13e790ff8eb5f2d3894e25347"


@pytest.mark.parametrize("draw, cases", [(uniform, FROZEN_UNIFORM), (noise, FROZEN_NOISE)])
def test_values_equal_the_frozen_numpy_path(draw, cases):
    for seed, ids, shape, stream, values in cases:
        got = draw(seed, np.array(ids, dtype=np.uint64), shape, stream)
        assert got.dtype == torch.float32 and got.shape == (len(ids), *shape)
        assert torch.equal(got.flatten(), torch.tensor(values, dtype=torch.float32))
    ids = np.arange(1000, 1064)
    z, u = noise(11, ids, (3, 32, 32)), uniform(11, ids, (3, 32, 32), stream=2)
    assert hashlib.sha256(z.numpy().tobytes()).hexdigest() == FROZEN_NOISE_SHA256
    assert hashlib.sha256(u.numpy().tobytes()).hexdigest() == FROZEN_UNIFORM_SHA256


@pytest.mark.parametrize("shape", [(1,), (3,), (5,), (2, 7), (33,)])
def test_values_do_not_depend_on_the_tiles(monkeypatch, shape):
    ids = torch.tensor([0, 3, 2**35 + 1, 17, 9])
    z, u = noise(4, ids, shape), uniform(4, ids, shape)
    for counters in (1, 3, 8):  # one block per tile, partial tiles, several rows per tile
        monkeypatch.setattr(rf.noise, "_CPU_TILE", counters)
        assert torch.equal(noise(4, ids, shape), z)
        assert torch.equal(uniform(4, ids, shape), u)


def test_noise_is_independent_of_batch_split():
    ids = np.arange(1000, 1500)
    whole = noise(7, ids, (3, 4))
    for size in (1, 13, 64, 499):
        parts = torch.cat([noise(7, ids[i : i + size], (3, 4)) for i in range(0, len(ids), size)])
        assert torch.equal(parts, whole)
    shuffled = np.random.default_rng(0).permutation(ids)
    assert torch.equal(noise(7, shuffled, (3, 4)), whole[shuffled - 1000])
    assert torch.equal(noise(7, torch.from_numpy(ids), (3, 4)), whole)
    assert torch.equal(noise(7, list(ids), (3, 4)), whole)


def test_noise_depends_on_seed_stream_and_large_ids():
    ids = np.array([0, 1, 2**40 + 5])
    a = noise(1, ids, (8,))
    assert not torch.equal(a, noise(2, ids, (8,)))
    assert not torch.equal(a, noise(1, ids, (8,), stream=STREAMS.time))
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


def test_empty_draws_have_the_right_shape():
    assert noise(0, np.array([], dtype=np.int64), (3, 2)).shape == (0, 3, 2)
    assert uniform(0, [1, 2], (0, 4)).shape == (2, 0, 4)


def test_noise_rejects_bad_ids_seeds_and_streams():
    with pytest.raises(ValueError, match="non-negative"):
        noise(0, np.array([-1]), (2,))
    with pytest.raises(ValueError, match="non-negative"):
        noise(0, torch.tensor([3, -1]), (2,))
    with pytest.raises(ValueError, match="non-negative"):
        noise(0, np.array([2**63], dtype=np.uint64), (2,))
    with pytest.raises(ValueError, match="non-negative"):
        noise(0, torch.tensor([1.0]), (2,))
    with pytest.raises(ValueError, match="seed"):
        noise(-5, np.array([1]), (2,))
    with pytest.raises(ValueError, match="stream"):
        uniform(0, np.array([1]), stream=2**32)
    with pytest.raises(ValueError, match="one-dimensional"):
        noise(0, np.zeros((2, 2), dtype=np.int64), (2,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_match_the_cpu():
    ids = torch.arange(5000, 5064)
    words = torch.randint(0, 2**32, (4096, 4), dtype=torch.int64)
    keys = torch.randint(0, 2**32, (4096, 2), dtype=torch.int64)
    assert torch.equal(philox4x32(words.cuda(), keys.cuda()).cpu(), philox4x32(words, keys))
    u = uniform(3, ids, (3, 64, 64), device="cuda")
    assert u.device.type == "cuda" and torch.equal(u.cpu(), uniform(3, ids, (3, 64, 64)))  # guaranteed
    z_cpu, z_gpu = noise(3, ids, (3, 64, 64)), noise(3, ids.cuda(), (3, 64, 64)).cpu()
    # float32 values may differ by one ulp, rarely (module docstring): bound both
    differ = z_cpu != z_gpu
    assert differ.sum().item() <= 2
    assert torch.equal(torch.nextafter(z_cpu[differ], z_gpu[differ]), z_gpu[differ])


# ---------------------------------------------------------------------- the stream registry


def test_streams_keep_their_historical_numbers():
    assert (STREAMS.x0, STREAMS.toy_uniform, STREAMS.toy_normal, STREAMS.time) == (0, 1, 2, 3)
    assert STREAMS.sde_step(0) == 1 << 20 and STREAMS.sde_step(17) == (1 << 20) + 17


def _all_draws(bound: int) -> dict[int, tuple[str, int | None]]:
    """stream number → (name, index) for every fixed stream and, for every family, the indices
    [0, bound) and [size − bound, size); fails on the first number drawn twice."""
    drawn: dict[int, tuple[str, int | None]] = {}
    for name, _, _ in STREAMS.intervals():
        value = getattr(STREAMS, name)
        if isinstance(value, StreamFamily):
            indices = [*range(min(bound, value.size)), *range(max(bound, value.size - bound), value.size)]
            pairs = [((name, i), value(i)) for i in indices]
        else:
            pairs = [((name, None), value)]
        for user, number in pairs:
            assert 0 <= number < 2**32, (user, number)
            assert number not in drawn, f"{user} and {drawn.get(number)} share stream {number}"
            drawn[number] = user
    return drawn


def test_no_two_users_share_a_stream():
    # Exhaustive over the first and last 2**16 indices of every family (every epoch, round and
    # SDE step a run reaches in practice, and the boundaries of every family's range) …
    drawn = _all_draws(1 << 16)
    assert len(drawn) == 5 + 4 * 2 * (1 << 16)
    # … and for every index: each family maps index ↦ base + index, a bijection onto
    # [base, base + size), and these intervals and the fixed numbers are pairwise disjoint.
    intervals = STREAMS.intervals()
    for (_, first, size), (name, following, _) in zip(intervals, intervals[1:]):
        assert first + size <= following, name
    assert intervals[-1][1] + intervals[-1][2] <= 2**32
    for name, first, size in intervals:
        family = getattr(STREAMS, name)
        if isinstance(family, StreamFamily):
            assert (family(0), family(1), family(size - 1)) == (first, first + 1, first + size - 1)
    # the collision of the hand-picked numbers (8 + 16·2 = 40 = the image epoch stream) is gone
    assert STREAMS.shard_rotation(2) != STREAMS.image_epoch(0)


@pytest.mark.parametrize("index", [-1, 1 << 28, 1.5, "3", None])
def test_family_indices_out_of_range_are_refused(index):
    with pytest.raises(ValueError, match="image_epoch index"):
        STREAMS.image_epoch(index)


def test_sde_steps_are_bounded_by_their_family():
    assert STREAMS.sde_step((1 << 20) - 1) == (1 << 21) - 1
    with pytest.raises(ValueError, match=r"sde_step index must be in \[0, 1048576\)"):
        STREAMS.sde_step(1 << 20)


def test_a_registry_with_overlapping_streams_is_refused():
    with pytest.raises(ValueError, match="overlaps"):
        Streams(image_flip=3)
    with pytest.raises(ValueError, match="overlaps"):
        Streams(shard_rotation=StreamFamily("shard_rotation", (1 << 28) + 5, 4))
    with pytest.raises(ValueError, match="overlaps"):
        Streams(sde_step=StreamFamily("sde_step", 2**32 - 2, 4))
    with pytest.raises(ValueError, match="named"):
        Streams(sde_step=StreamFamily("time", 1 << 20, 4))
