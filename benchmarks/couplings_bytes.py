"""Bytes per CIFAR-sized pair (3×32×32) on storage, for each way the coupling stage can store it.

- ``float32``: x0 and x1 in float32 (the official code's .npy layout costs 24.6 KB a pair);
- ``float16_no_x0``: x1 in float16, x0 regenerated from the seed on read (target ≤ 6.2 KB);
- ``uint8_no_x0``: x1 as uint8 pixels, x0 regenerated (rfpp's PNGs cost about 3 KB).

x0 is the stage's own noise; x1 are smooth random images in [−1, 1] (bicubic upsampling of 8×8
noise, plus a little pixel noise), as a teacher's samples are smooth rather than constant. Each
variant is encoded as one shard by :func:`workflows.couplings.encode_shard`, exactly as the stage
writes it. Run: ``python benchmarks/couplings_bytes.py`` (seconds). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from workflows.couplings import CouplingFormat, encode_shard
from workflows.distributions import sample_by_id
from workflows.settings import NoiseSpec

SHAPE = [3, 32, 32]
VARIANTS = {"float32": ("float32", True), "float16_no_x0": ("float16", False), "uint8_no_x0": ("uint8", False)}


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """Images in [−1, 1] with structure at a few scales (not constant, not white noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator) * 2 - 1
    images = F.interpolate(coarse, size=SHAPE[1:], mode="bicubic", align_corners=False)
    return (images + 0.03 * torch.randn(count, *SHAPE, generator=generator)).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=512)
    args = parser.parse_args()

    ids = np.arange(args.pairs)
    pi0 = NoiseSpec(shape=SHAPE)
    x0, x1 = sample_by_id(pi0, 0, ids), smooth_images(args.pairs, 1)
    nfe = torch.full((args.pairs,), 127)
    sizes = {}
    for name, (dtype, x0_stored) in VARIANTS.items():
        fmt = CouplingFormat(
            shape=SHAPE,
            dtype=dtype,
            x0_stored=x0_stored,
            seed=0,
            pi0=pi0,
            teacher_hash="0" * 16,
            solver="rk45@1e-05",
            shard_size=args.pairs,
        )
        sizes[name] = round(len(encode_shard(fmt, 0, ids, x0, x1, nfe)) / args.pairs, 1)
        print(f"{name:>14}: {sizes[name] / 1000:6.2f} KB a pair ({args.pairs} pairs in one shard)", flush=True)
    print(json.dumps({"bytes_per_pair": sizes}))


if __name__ == "__main__":
    main()
