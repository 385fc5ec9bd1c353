"""Time and memory of drawing X0 with the torch Philox path of :mod:`rf.noise`, against the NumPy path.

Two arms, measured side by side in one process with one thread each (NumPy's element-wise
operations use one thread whatever the settings; torch is set to one with
``torch.set_num_threads(1)``), in interleaved repetitions, medians reported. Time is the CPU time
of the process (``time.process_time``): with one thread it is the wall time of an idle machine,
and it does not count the time slices other processes take on a shared one.

- ``numpy``: the pre-torch path, frozen here as the baseline: :func:`rf.noise.philox4x32_numpy`
  on the counters of 2**18-counter chunks of ids, then uniforms and Box–Muller in float64 over
  the whole batch;
- ``torch``: :func:`rf.noise.noise` on the CPU (torch int64 Philox, float64 Box–Muller, tiles).

Each arm draws X0 of ``--samples`` (64) examples of shape 3×256×256 (12.6 M float32 values):
``torch_vs_numpy`` = time(numpy) ÷ time(torch), goal ≥ 5. The same at 1/8 of the batch
(``torch_vs_numpy_small``) shows how the ratio depends on the batch. Also printed:
``integers_equal``, whether :func:`rf.noise.philox4x32` (torch) gives the same words as the NumPy
reference on every counter of the batch; ``float32_mismatches``, how many float32 values of the
two arms differ (the rounding caveat of :mod:`rf.noise`: expected 0, not guaranteed); and the peak
extra memory of each arm beyond its float32 result, at both batch sizes (growth at 8× the work),
measured in a fresh process per arm as the rise of the peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs``) over the resident set before the call.

Where the torch arm's time goes: ``transcendental_share`` is the time torch's float64 ``log``,
``sqrt``, ``cos`` and ``sin`` take over as many values as one draw of the batch (one of each per
pair of words), timed alone in the same rounds, ÷ the torch arm's time — the part both paths pay
alike (bit-equal floats need the float64 functions). Most of the rest is Philox: ten rounds of
ten int64 operations, each a separate pass over the tile in eager torch.

Run: ``python benchmarks/noise.py`` (about 30 s on 2 cores). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rf.noise import noise, philox4x32, philox4x32_numpy

SHAPE = (3, 256, 256)
SEED, FIRST_ID = 2024, 10_000
_ROWS_PER_CHUNK = 4  # the NumPy path's chunk: 2**18 counters ÷ 65536 blocks per 3×256×256 id


def _counters(ids: np.ndarray, blocks: int) -> np.ndarray:
    """uint32 counters ``(j, id lo, id hi, 0)`` of X0 (stream 0), shape (len(ids), blocks, 4)."""
    ids = ids.astype(np.uint64)
    counter = np.zeros((ids.size, blocks, 4), dtype=np.uint32)
    counter[..., 0] = np.arange(blocks, dtype=np.uint32)
    counter[..., 1] = (ids & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
    counter[..., 2] = (ids >> np.uint64(32)).astype(np.uint32)[:, None]
    return counter


def numpy_noise(seed: int, ids: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """X0 by the NumPy path as it was before the torch one (the baseline arm)."""
    n = math.prod(shape)
    pairs = -(-n // 2)
    blocks = -(-2 * pairs // 4)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)
    u = np.empty((ids.size, 2 * pairs), dtype=np.float64)
    for start in range(0, ids.size, _ROWS_PER_CHUNK):
        chunk = ids[start : start + _ROWS_PER_CHUNK]
        words = philox4x32_numpy(_counters(chunk, blocks), key).reshape(chunk.size, blocks * 4)[:, : 2 * pairs]
        u[start : start + chunk.size] = (words.astype(np.float64) + 0.5) / 2.0**32
    u = u.reshape(ids.size, pairs, 2)
    radius = np.sqrt(-2.0 * np.log(u[..., 0]))
    angle = 2.0 * np.pi * u[..., 1]
    z = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1).reshape(ids.size, 2 * pairs)[:, :n]
    return torch.from_numpy(z.astype(np.float32)).reshape(ids.size, *shape)


ARMS: dict[str, Callable[[int, np.ndarray, tuple[int, ...]], torch.Tensor]] = {"numpy": numpy_noise, "torch": noise}


def transcendentals(samples: int) -> float:
    """CPU seconds of torch's float64 log, sqrt, cos and sin over ``samples`` × ⌈n/2⌉ values each
    (a draw's Box–Muller), in tiles of 2**16 values, outputs preallocated."""
    values = samples * -(-math.prod(SHAPE) // 2)
    u = torch.rand(1 << 16, dtype=torch.float64).add_(2.0**-33)
    out = torch.empty_like(u)
    started = time.process_time()
    for start in range(0, values, len(u)):
        size = min(len(u), values - start)
        for function in (torch.log, torch.sqrt, torch.cos, torch.sin):
            function(u[:size], out=out[:size])
    return time.process_time() - started


def integers_equal(ids: np.ndarray, blocks: int) -> bool:
    """Torch and NumPy Philox words on every counter of X0 of ``ids``."""
    key = np.array([SEED & 0xFFFFFFFF, SEED >> 32], dtype=np.uint32)
    for start in range(0, len(ids), _ROWS_PER_CHUNK):
        counter = _counters(ids[start : start + _ROWS_PER_CHUNK], blocks)
        expected = philox4x32_numpy(counter, key).astype(np.int64)
        got = philox4x32(torch.from_numpy(counter.astype(np.int64)), torch.from_numpy(key.astype(np.int64)))
        if not np.array_equal(got.numpy(), expected):
            return False
    return True


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_extra_mib(arm: str, samples: int) -> float:
    """In a fresh process: the rise of the peak resident set during one call of ``arm``, less
    the float32 result."""
    code = (
        f"import sys, numpy as np, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import noise as b\n"
        f"torch.set_num_threads(1); ids = np.arange(b.FIRST_ID, b.FIRST_ID + {samples})\n"
        f"b.ARMS['{arm}'](b.SEED, ids[:1], b.SHAPE)  # load code paths\n"
        "open('/proc/self/clear_refs', 'w').write('5'); before = b._status_kib('VmRSS')\n"
        f"out = b.ARMS['{arm}'](b.SEED, ids, b.SHAPE)\n"
        "print((b._status_kib('VmHWM') - before) / 1024 - out.numel() * 4 / 2**20)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="examples of shape 3x256x256 per draw")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions of every arm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = (max(1, args.samples // 8), args.samples)
    times: dict[tuple[str, int], list[float]] = {(arm, size): [] for size in sizes for arm in ARMS}
    outputs: dict[str, torch.Tensor] = {}
    floor: list[float] = []
    noise(SEED, np.arange(2), SHAPE)  # warm-up: first-call costs
    for repeat in range(args.repeats):
        for arm, size in times:
            started = time.process_time()
            out = ARMS[arm](SEED, np.arange(FIRST_ID, FIRST_ID + size), SHAPE)
            times[arm, size].append(time.process_time() - started)
            if size == args.samples:
                outputs[arm] = out
        floor.append(transcendentals(args.samples))
        done = ", ".join(f"{arm} x{size} {taken[-1]:.3f}" for (arm, size), taken in times.items())
        print(f"repeat {repeat} (CPU s): {done}", flush=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    transcendental_s = statistics.median(floor)
    mismatches = int((outputs["numpy"] != outputs["torch"]).sum())
    del outputs
    equal = integers_equal(np.arange(FIRST_ID, FIRST_ID + args.samples), -(-math.prod(SHAPE) // 4))
    memory = {(arm, size): peak_extra_mib(arm, size) for arm, size in times}
    small, large = sizes
    for size in sizes:
        print(
            f"{size} samples: numpy {median['numpy', size]:.3f} CPU s, torch {median['torch', size]:.3f} CPU s; "
            f"peak extra memory numpy {memory['numpy', size]:.0f} MiB, torch {memory['torch', size]:.0f} MiB"
        )
    print(
        json.dumps(
            {
                "torch_vs_numpy": round(median["numpy", large] / median["torch", large], 2),
                "torch_vs_numpy_small": round(median["numpy", small] / median["torch", small], 2),
                "goal": 5,
                "threads": 1,
                "samples": large,
                "samples_small": small,
                "transcendental_share": round(transcendental_s / median["torch", large], 2),
                "numpy_cpu_s": round(median["numpy", large], 4),
                "torch_cpu_s": round(median["torch", large], 4),
                "integers_equal": equal,
                "float32_mismatches": mismatches,
                "values": large * math.prod(SHAPE),
                "numpy_peak_extra_mib": round(memory["numpy", large], 1),
                "torch_peak_extra_mib": round(memory["torch", large], 1),
                "numpy_peak_extra_mib_small": round(memory["numpy", small], 1),
                "torch_peak_extra_mib_small": round(memory["torch", small], 1),
                "output_mib": round(large * math.prod(SHAPE) * 4 / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
