"""Counter-based noise: the random numbers of example ``i`` are a pure function of ``(seed, i)``.

A coupling pair ``(Z0, Z1 = Flow(Z0))`` must not depend on how its ids were split into batches,
workers, blocks or retries. A sequential generator cannot promise that; a counter-based one can:
Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
128-bit counter and a 64-bit key to four 32-bit words with a fixed bijection, so every number is
addressed directly.

Layout used here, for example id ``i`` (int64), block ``j`` and stream ``s``::

    counter = (j, i mod 2**32, i div 2**32, s)      key = (seed mod 2**32, seed div 2**32)

Each block gives four uint32 words, turned into uniforms ``u = (w + 0.5) / 2**32`` in (0, 1) and,
for normals, by Box–Muller ``z = sqrt(-2 ln u1) · (cos 2πu2, sin 2πu2)``. Streams separate uses
of the same id (``s = 0`` for the initial noise X0, other values for time draws, SDE steps, …).
Everything is computed in NumPy on the CPU so the values are the same on every machine.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint32(0x9E3779B9)
_W1 = np.uint32(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_ROUNDS = 10
_COUNTERS_PER_CHUNK = 1 << 18  # bounds the temporary memory of one call

STREAM_X0 = 0
"""Stream of the initial noise X0 of a pair."""


def philox4x32(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 block function.

    ``counter``: uint32 array of shape (..., 4); ``key``: uint32 array of shape (..., 2)
    (broadcast against ``counter``). Returns uint32 words of shape (..., 4).
    """
    c = [counter[..., k].astype(np.uint64) for k in range(4)]
    k0 = np.broadcast_to(key[..., 0], c[0].shape).astype(np.uint32)
    k1 = np.broadcast_to(key[..., 1], c[0].shape).astype(np.uint32)
    for _ in range(_ROUNDS):
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [
            hi1 ^ c[1] ^ k0.astype(np.uint64),
            lo1,
            hi0 ^ c[3] ^ k1.astype(np.uint64),
            lo0,
        ]
        k0 = k0 + _W0
        k1 = k1 + _W1
    return np.stack([w.astype(np.uint32) for w in c], axis=-1)


def _as_ids(ids: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    array = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {array.shape}")
    if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0):
        raise ValueError("ids must be non-negative integers")
    return array.astype(np.uint64)


def _check_seed(seed: int) -> None:
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")


def _uniform_words(seed: int, ids: np.ndarray, n: int, stream: int) -> np.ndarray:
    """``n`` uniforms in (0, 1) per id, float64, shape (len(ids), n)."""
    _check_seed(seed)
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")
    seed = int(seed)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)
    blocks = -(-n // 4)
    out = np.empty((ids.size, n), dtype=np.float64)
    rows_per_chunk = max(1, _COUNTERS_PER_CHUNK // max(blocks, 1))
    for start in range(0, ids.size, rows_per_chunk):
        chunk = ids[start : start + rows_per_chunk]
        counter = np.empty((chunk.size, blocks, 4), dtype=np.uint32)
        counter[..., 0] = np.arange(blocks, dtype=np.uint32)[None, :]
        counter[..., 1] = (chunk & _MASK32).astype(np.uint32)[:, None]
        counter[..., 2] = (chunk >> np.uint64(32)).astype(np.uint32)[:, None]
        counter[..., 3] = np.uint32(stream)
        words = philox4x32(counter, key).reshape(chunk.size, blocks * 4)[:, :n]
        out[start : start + chunk.size] = (words.astype(np.float64) + 0.5) / 2.0**32
    return out


def uniform(
    seed: int,
    ids: torch.Tensor | np.ndarray | Sequence[int],
    shape: Sequence[int] = (),
    stream: int = STREAM_X0,
) -> torch.Tensor:
    """Uniforms in (0, 1): a float32 tensor of shape ``(len(ids), *shape)``, a pure function of
    ``(seed, id, stream)`` for each row."""
    id_array = _as_ids(ids)
    n = int(np.prod(shape, dtype=np.int64))
    u = _uniform_words(seed, id_array, n, stream)
    return torch.from_numpy(u.astype(np.float32)).reshape(id_array.size, *shape)


def noise(
    seed: int,
    ids: torch.Tensor | np.ndarray | Sequence[int],
    shape: Sequence[int],
    stream: int = STREAM_X0,
) -> torch.Tensor:
    """Standard normal noise: a float32 tensor of shape ``(len(ids), *shape)``.

    Row ``r`` depends only on ``(seed, ids[r], stream)``: the same id gives the same tensor
    however the ids are split into batches or workers.
    """
    id_array = _as_ids(ids)
    n = int(np.prod(shape, dtype=np.int64))
    pairs = -(-n // 2)
    u = _uniform_words(seed, id_array, 2 * pairs, stream).reshape(id_array.size, pairs, 2)
    radius = np.sqrt(-2.0 * np.log(u[..., 0]))
    angle = 2.0 * np.pi * u[..., 1]
    z = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
    z = z.reshape(id_array.size, 2 * pairs)[:, :n]
    return torch.from_numpy(z.astype(np.float32)).reshape(id_array.size, *shape)
