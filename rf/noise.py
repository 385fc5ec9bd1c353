"""Counter-based noise: the random numbers of example ``i`` are a pure function of ``(seed, i, stream)``.

A coupling pair ``(Z0, Z1 = Flow(Z0))`` must not depend on how its ids were split into batches,
workers, blocks, retries or devices. A sequential generator cannot promise that; a counter-based
one can: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
maps a 128-bit counter and a 64-bit key to four 32-bit words with a fixed bijection, so every
number is addressed directly and can be computed where the model runs (CPU or CUDA).

Layout, for example id ``i`` (int64, 0 ≤ i < 2**63), block ``j`` and stream ``s``::

    counter = (j, i mod 2**32, i div 2**32, s)      key = (seed mod 2**32, seed div 2**32)

Block ``j`` gives the words ``w[4j] … w[4j + 3]`` of the id; a draw of ``n`` numbers uses words
``0 … n − 1`` (:func:`uniform`) or ``0 … 2⌈n/2⌉ − 1`` (:func:`noise`).

Streams
-------
A stream separates the uses of one ``(seed, id)``. Every stream number is allocated by
:data:`STREAMS`, the single registry; a number is ``family base + index``:

=====================  ============================  ==================================================
stream                 numbers                       drawn for
=====================  ============================  ==================================================
``x0``                 0                             initial noise X0 of a pair (π0 = N(0, I))
``toy_uniform``        1                             uniforms of the 2D toy distributions (:mod:`rf.toy`)
``toy_normal``         2                             normals of the 2D toy distributions
``time``               3                             training time t of an example
``image_flip``         4                             horizontal flip of an image example
``sde_step(k)``        2**20 + k,  k < 2**20         Brownian increment Z_k of SDE step k (:mod:`rf.sde`)
``image_epoch(e)``     1·2**28 + e, e < 2**28        permutation of an image dataset in epoch e
``shard_order(e)``     2·2**28 + e, e < 2**28        order of the coupling shards in epoch e
``shard_rotation(e)``  3·2**28 + e, e < 2**28        rotation (shuffle-window start) of a shard in epoch e
(free)                 5 … 2**20 − 1                 new fixed streams
(free)                 2**21 … 2**28 − 1             new families (e.g. one per reflow round)
(free)                 2**30 … 2**32 − 1             new families
=====================  ============================  ==================================================

Each family owns an interval ``[base, base + size)`` and maps ``index ↦ base + index`` (a
bijection onto it); the intervals and the fixed numbers are pairwise disjoint (checked when the
registry is built), so no two ``(name, index)`` pairs with index in range share a number, and an
index out of range raises ``ValueError``. Streams 0–3 and ``sde_step`` keep their historical
numbers, so draws made before the registry are unchanged.

Floats, and what is equal across devices
----------------------------------------
- **Words** are integers: :func:`philox4x32` computes them with torch int64 arithmetic (products
  of two words are below 2**64; their high word is recovered as ``(p >> 32) & 0xFFFFFFFF``, exact
  under the two's-complement wrap-around of int64 on CPU and CUDA). They are equal bit for bit
  on every device and to the NumPy reference :func:`philox4x32_numpy` (tested on the Random123
  known answers and random counters and keys, all-ones words included).
- **Uniforms** ``u = (w + 0.5) / 2**32``: exact in float64 (at most 33 significant bits), then one
  IEEE round-to-nearest-even to float32. Bit-identical on every device. As float32 they lie in
  ``[2**-33, 1]``: ``u`` rounds to 1.0 when ``w ≥ 2**32 − 128`` (probability 2**-25).
- **Normals** by Box–Muller in float64, ``z = sqrt(−2 ln u1) · (cos 2πu2, sin 2πu2)`` from the
  word pair ``(w[2m], w[2m+1])``, then one rounding to float32. ``u``, ``−2 ln u1 ↦ sqrt``,
  ``2π·u2`` and the products are correctly rounded IEEE operations, equal everywhere; ``ln``,
  ``cos`` and ``sin`` come from the device's float64 math library (ATen's vectorised SLEEF on
  CPU, ≤ 1 ulp; CUDA's libdevice, ≤ 2 ulp; the old NumPy path used NumPy's own SIMD code), which
  are not bit-equal to one another (ATen and NumPy disagree in the last float64 bit for ≈ 0.1–0.3 %
  of values). The float32 result differs only when the float64 value lies within those few float64
  ulps of a float32 rounding boundary (a float32 ulp is 2**29 float64 ulps): a probability of
  about 2**-29 per disagreeing value, and then by one float32 ulp. So equality of normals across
  devices and with the old NumPy path is measured, not guaranteed: ``benchmarks/noise.py`` counts
  the float32 values that differ between this path and the NumPy path (0 of 12.6 M on the
  machine it was written on), and the tests compare with frozen values of the NumPy path.

Memory
------
Work is done in tiles of at most ``_CPU_TILE`` = 2**16 counters on the CPU (a working set of a few
MiB, which stays in cache) and ``_DEVICE_TILE`` = 2**20 on an accelerator (enough work per
kernel launch): six int64 lanes, four float64 lanes and a temporary, about 100 bytes per counter
(≈ 6 MiB on the CPU, ≈ 100 MiB on CUDA) on top of the float32 result, whatever the number of ids
or the shape. Measured by ``benchmarks/noise.py`` for 8 and for 64 ids of 3×256×256: a 3–5 MiB
rise of the peak resident set beyond the result, against 52 and 367 MiB (≈ 8× the result) for
the NumPy path. Any device with int64 and float64 arithmetic works (CPU, CUDA; not MPS).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the round keys
_ROUNDS = 10
_CPU_TILE = 1 << 16  # counters per tile on the CPU (see "Memory" above)
_DEVICE_TILE = 1 << 20  # counters per tile on an accelerator

Ids = torch.Tensor | np.ndarray | Sequence[int]
Device = torch.device | str | None


# --------------------------------------------------------------------------- stream registry


@dataclass(frozen=True)
class StreamFamily:
    """Streams ``base + index`` for ``index`` in ``[0, size)`` (see the module's table)."""

    name: str
    base: int
    size: int

    def __call__(self, index: int) -> int:
        """The stream number of member ``index``; ``ValueError`` outside ``[0, size)``."""
        try:
            i = operator.index(index)
        except TypeError:
            raise ValueError(f"{self.name} index must be an integer, got {index!r}") from None
        if not 0 <= i < self.size:
            raise ValueError(f"{self.name} index must be in [0, {self.size}), got {i}")
        return self.base + i


@dataclass(frozen=True)
class Streams:
    """The registry of every random stream of rectiflow (the module's table)."""

    x0: int = 0
    toy_uniform: int = 1
    toy_normal: int = 2
    time: int = 3
    image_flip: int = 4
    sde_step: StreamFamily = StreamFamily("sde_step", 1 << 20, 1 << 20)
    image_epoch: StreamFamily = StreamFamily("image_epoch", 1 << 28, 1 << 28)
    shard_order: StreamFamily = StreamFamily("shard_order", 2 << 28, 1 << 28)
    shard_rotation: StreamFamily = StreamFamily("shard_rotation", 3 << 28, 1 << 28)

    def intervals(self) -> list[tuple[str, int, int]]:
        """``(name, first, size)`` of every stream (size 1) and family, sorted by first number."""
        out = []
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, StreamFamily):
                if value.name != field.name:
                    raise ValueError(f"stream family {field.name} is named {value.name!r}")
                out.append((field.name, value.base, value.size))
            else:
                out.append((field.name, value, 1))
        return sorted(out, key=lambda interval: interval[1])

    def __post_init__(self) -> None:
        end = 0
        for name, first, size in self.intervals():
            if first < end or size < 1 or first + size > 2**32:
                raise ValueError(f"stream {name} [{first}, {first + size}) overlaps another or leaves [0, 2**32)")
            end = first + size


STREAMS = Streams()
"""The single registry of stream numbers: ``STREAMS.x0``, ``STREAMS.sde_step(k)``, …"""


# --------------------------------------------------------------------------- Philox4x32-10


def _philox_lanes(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int | torch.Tensor,
    k1: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ten Philox rounds on counter lanes (contiguous int64 tensors of one shape holding words,
    overwritten) under key ``(k0, k1)`` (ints or tensors broadcasting to the lanes). One round::

        (c0, c1, c2, c3) ← (hi(M1·c2) ⊕ c1 ⊕ k0, lo(M1·c2), hi(M0·c0) ⊕ c3 ⊕ k1, lo(M0·c0)),
        (k0, k1) ← (k0 + W0, k1 + W1) mod 2**32

    In place: ten int64 operations per round. Low words are masked only at the end (their high
    bits are dropped by the next round's mask before any multiplication)."""
    p0, p1 = torch.empty_like(c0), torch.empty_like(c2)
    for _ in range(_ROUNDS):
        torch.mul(c0, _M0, out=p0)
        torch.mul(c2, _M1, out=p1)
        torch.bitwise_right_shift(p1, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(p0, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, p1 = p1, c1
        c3, p0 = p0, c3
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1.bitwise_and_(_MASK32), c2, c3.bitwise_and_(_MASK32)


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 block function in torch, on the device of ``counter``.

    ``counter``: integer tensor of shape (..., 4) and ``key`` of shape (..., 2) (broadcast
    against each other), holding words in [0, 2**32). Returns the int64 words, shape (..., 4).
    """
    counter, key = counter.to(torch.int64), key.to(device=counter.device, dtype=torch.int64)
    shape = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    lanes = [counter[..., k].expand(shape).clone() for k in range(4)]
    return torch.stack(_philox_lanes(*lanes, key[..., 0], key[..., 1]), dim=-1)


def philox4x32_numpy(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 in NumPy: the reference implementation (the pre-torch production path),
    kept to test :func:`philox4x32` against and as the baseline of ``benchmarks/noise.py``.

    ``counter``: uint32 array of shape (..., 4); ``key``: uint32 array of shape (..., 2)
    (broadcast against ``counter``). Returns uint32 words of shape (..., 4).
    """
    c = [counter[..., k].astype(np.uint64) for k in range(4)]
    k0 = np.broadcast_to(key[..., 0], c[0].shape).astype(np.uint32)
    k1 = np.broadcast_to(key[..., 1], c[0].shape).astype(np.uint32)
    m0, m1, mask = np.uint64(_M0), np.uint64(_M1), np.uint64(_MASK32)
    for _ in range(_ROUNDS):
        p0, p1 = m0 * c[0], m1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        c = [hi1 ^ c[1] ^ k0.astype(np.uint64), lo1, hi0 ^ c[3] ^ k1.astype(np.uint64), lo0]
        k0, k1 = k0 + np.uint32(_W0), k1 + np.uint32(_W1)
    return np.stack([w.astype(np.uint32) for w in c], axis=-1)


# --------------------------------------------------------------------------- uniforms and normals


def _as_ids(ids: Ids, device: Device) -> torch.Tensor:
    """``ids`` as an int64 tensor on ``device`` (default: the device of a tensor ``ids``, else CPU)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be non-negative integers, got dtype {ids.dtype}")
        tensor = ids.to(device=ids.device if device is None else device, dtype=torch.int64)
    else:
        array = np.asarray(ids)
        if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() >= 2**63):
            raise ValueError("ids must be non-negative integers below 2**63")
        tensor = torch.as_tensor(array.astype(np.int64), device=device)
    if tensor.dim() != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {tuple(tensor.shape)}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError("ids must be non-negative integers below 2**63")
    return tensor


def _draw(seed: int, ids: Ids, n: int, stream: int, device: Device, normal: bool) -> torch.Tensor:
    """Words ``0 … n − 1`` of every id as float32 uniforms, or as normals when ``normal`` (``n`` even
    then): a tensor ``(len(ids), n)`` on the ids' device, filled tile by tile."""
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= int(stream) < 2**32:
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")
    seed, stream = int(seed), int(stream)
    ids = _as_ids(ids, device)
    out = torch.empty(len(ids), n, dtype=torch.float32, device=ids.device)
    blocks = -(-n // 4)
    per_tile = _CPU_TILE if ids.device.type == "cpu" else _DEVICE_TILE
    block_step = max(1, min(blocks, per_tile))
    row_step = max(1, per_tile // block_step)
    for r0 in range(0, len(ids), row_step):
        rows = ids[r0 : r0 + row_step, None]
        for b0 in range(0, blocks, block_step):
            b1 = min(blocks, b0 + block_step)
            shape = (len(rows), b1 - b0)
            words = _philox_lanes(
                torch.arange(b0, b1, device=ids.device).expand(shape).clone(),
                (rows & _MASK32).expand(shape).clone(),
                (rows >> 32).expand(shape).clone(),
                torch.full(shape, stream, dtype=torch.int64, device=ids.device),
                seed & _MASK32,
                seed >> 32,
            )
            whole = 4 * b1 <= n
            tile = out[r0 : r0 + len(rows), 4 * b0 : 4 * b1] if whole else out.new_empty(shape[0], 4 * shape[1])
            _to_floats(words, tile.view(*shape, 4), normal)
            if not whole:
                out[r0 : r0 + len(rows), 4 * b0 :] = tile[:, : n - 4 * b0]
    return out


def _to_floats(words: Sequence[torch.Tensor], tile: torch.Tensor, normal: bool) -> None:
    """Fill the float32 ``tile`` (rows, blocks, 4): ``tile[..., k]`` from word lane ``k``, the
    uniform ``(w + 0.5) / 2**32``, or Box–Muller normals of the lane pairs (0, 1) and (2, 3); all
    in float64, rounded once to float32."""
    u = [w.to(torch.float64).add_(0.5).mul_(2.0**-32) for w in words]  # exact in float64
    if normal:
        for k in (0, 2):
            radius = u[k].log_().mul_(-2.0).sqrt_()
            angle = u[k + 1].mul_(2.0 * math.pi)
            u[k], u[k + 1] = torch.cos(angle).mul_(radius), angle.sin_().mul_(radius)
    for k in range(4):
        tile[..., k].copy_(u[k])


def uniform(
    seed: int,
    ids: Ids,
    shape: Sequence[int] = (),
    stream: int = STREAMS.x0,
    *,
    device: Device = None,
) -> torch.Tensor:
    """Uniforms ``(w + 0.5) / 2**32``: a float32 tensor of shape ``(len(ids), *shape)``, a pure
    function of ``(seed, id, stream)`` for each row, bit-identical on every device.

    Computed on ``device`` (default: the device of a tensor ``ids``, else the CPU).
    """
    u = _draw(seed, ids, math.prod(shape), stream, device, normal=False)
    return u.reshape(len(u), *shape)


def noise(
    seed: int,
    ids: Ids,
    shape: Sequence[int],
    stream: int = STREAMS.x0,
    *,
    device: Device = None,
) -> torch.Tensor:
    """Standard normal noise: a float32 tensor of shape ``(len(ids), *shape)``.

    Row ``r`` depends only on ``(seed, ids[r], stream)``: the same id gives the same tensor
    however the ids are split into batches, workers or devices (up to the float32 rounding
    caveat of the module docstring). Computed on ``device`` (default: the device of a tensor
    ``ids``, else the CPU).
    """
    n = math.prod(shape)
    z = _draw(seed, ids, n + n % 2, stream, device, normal=True)
    return z[:, :n].reshape(len(z), *shape)
