"""Peak memory of k-NN precision/recall on 10× the points, blocked, against the plain N × N way.

:func:`rf.metrics.precision_recall` (k = 3, float64 distances on the CPU) of two sets of N
float32 points in d = 64 dimensions (real ~ N(0, I), generated ~ N(0, 1.05² I)), in three arms:

- ``blocked`` at N = 50,000 and at N = 5,000: the default block, as many query rows as fit in
  ``DISTANCE_BLOCK_BYTES`` (128 MiB) of float64 distances;
- ``plain`` at N = 5,000: ``block=N``, one N × N block, the plain unblocked computation
  (N² float64 = 191 MiB at 5,000; at 50,000 it would be 19 GiB, which is computed here, not run;
  the code before blocking held two more N × N arrays, for the square root and the partition).

Each arm runs in a fresh Python process: it imports torch, draws its points, makes one small
warm-up call (so thread pools and BLAS buffers exist), then resets the kernel's record of its
peak resident set (``5`` into ``/proc/self/clear_refs``, Linux) and reads its RSS. After the call,
the peak (``VmHWM``) minus that RSS is the arm's peak growth: every allocation of torch, the BLAS
and Python, which tracemalloc would not see. The blocked and plain arms must give the same
precision and recall at 5,000 (checked).
What to expect: the blocked peak is the one block (128 MiB) plus the float64 copies of the two
sets (2·N·d·8 bytes: 5 MiB at 5,000, 49 MiB at 50,000), so peak_ratio_10x (blocked at 50,000 ÷
at 5,000) stays near 1.3 while the work grows 100×; the plain way's peak is the N² matrix, ×100.
Target: knn_block_peak_mb ≤ 1,000 at 50,000.
Run: ``python benchmarks/knn_memory.py`` (about 95 CPU-seconds, 80 of them the N = 50,000 arm: 1–2
minutes on 2 idle cores, longer on a shared machine). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from rf.metrics import precision_recall

DIM, K = 64, 3


def peak_resident_bytes() -> int:
    """The process's peak resident set since the last reset (VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def run_arm(arm: str, n: int) -> dict[str, float]:
    """Peak RSS growth (bytes), wall and CPU seconds and the result of one precision/recall call."""
    g = torch.Generator().manual_seed(n)
    real, generated = torch.randn(n, DIM, generator=g), torch.randn(n, DIM, generator=g) * 1.05
    precision_recall(real[:100], generated[:100], K)
    Path("/proc/self/clear_refs").write_text("5")
    before = psutil.Process().memory_info().rss
    started, cpu_started = time.perf_counter(), time.process_time()
    precision, recall = precision_recall(real, generated, K, block=n if arm == "plain" else None)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = peak_resident_bytes() - before
    return {
        "peak_bytes": peak,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "precision": precision,
        "recall": recall,
    }


def arm_in_fresh_process(arm: str, n: int) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, __file__, "--arm", arm, "--n", str(n)], capture_output=True, text=True, check=True
    )
    result = json.loads(completed.stdout.splitlines()[-1])
    print(
        f"{arm} N={n}: peak growth {result['peak_bytes'] / 2**20:.0f} MiB in {result['seconds']:.1f} s "
        f"({result['cpu_seconds']:.1f} CPU-s), "
        f"precision {result['precision']:.4f}, recall {result['recall']:.4f}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="points of each set in the large arm")
    parser.add_argument("--small", type=int, default=5_000, help="points of each set in the small arms")
    parser.add_argument("--arm", choices=("blocked", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # a child: one arm, one JSON line
        print(json.dumps(run_arm(args.arm, args.n)))
        return

    small = arm_in_fresh_process("blocked", args.small)
    plain = arm_in_fresh_process("plain", args.small)
    large = arm_in_fresh_process("blocked", args.n)
    if (small["precision"], small["recall"]) != (plain["precision"], plain["recall"]):
        raise SystemExit(f"blocked and plain disagree at N={args.small}: {small} vs {plain}")
    print(f"the plain N x N float64 matrix at N={args.n} alone: {args.n**2 * 8 / 2**20:.0f} MiB (not run)")
    print(
        json.dumps(
            {
                "knn_block_peak_mb": round(large["peak_bytes"] / 2**20, 1),
                "peak_ratio_10x": round(large["peak_bytes"] / small["peak_bytes"], 3),
                "block_peak_mb_small": round(small["peak_bytes"] / 2**20, 1),
                "plain_peak_mb_small": round(plain["peak_bytes"] / 2**20, 1),
                "plain_matrix_mb_large": round(args.n**2 * 8 / 2**20, 1),
                "seconds_large": round(large["seconds"], 1),
                "cpu_seconds_large": round(large["cpu_seconds"], 1),
                "n_large": args.n,
                "n_small": args.small,
            }
        )
    )


if __name__ == "__main__":
    main()
