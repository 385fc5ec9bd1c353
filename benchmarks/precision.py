"""bf16 against fp32 reflow pairs, compiled against eager training, fused against looped EMA (CPU).

All on the digits UNet of ``configs/digits.yaml`` (model and training settings read from it):
noise → scikit-learn's bundled 8×8 digits, upsampled to 16×16 (no download). The UNet is first
trained for ``--steps`` steps (eager, one thread) so that its velocity field means something.

- ``bf16_vs_fp32_pair_distance``: the same ``--pairs`` noise samples Z0 (by id) solved with the
  trained EMA network in fp32 and with the network under bf16 autocast (the solver's states stay
  fp32), at rk45@1e-5 and at euler@1: mean ‖Z1_bf16 − Z1_fp32‖ ÷ mean ‖Z1_fp32 − Z0‖, the bf16
  error as a fraction of the transport length. ``rk45_nfe`` is the mean NFE of each precision:
  the error control sees bf16's rounding of v as local error, so it can take more steps.
- ``compile_vs_eager_steps``: training steps/s with ``VelocityTrainer(compile=True)`` ÷ without
  (inductor on CPU), on batches of the same size and kind. The compiled trainer's first
  ``WARMUP`` steps (tracing and compilation, reported as ``compile_warmup_s``) are excluded; the
  arms run eager, compiled, eager, compiled and each rate is the mean of its two runs. Reported,
  no goal: on CPU the convolutions dominate and inductor only fuses the element-wise work around
  them; the GPU figure is ``benchmarks/gpu.py``'s.
- ``fused_ema_vs_loop``: EMA updates/s of :meth:`rf.models.EMA.update` (one multi-tensor lerp)
  ÷ the per-tensor Python loop it replaced, on the digits UNet and on a wider one (base 64,
  two res blocks per level). Reported, no goal: on CPU the multi-tensor op still visits the
  tensors one by one in C++, so only Python's per-tensor overhead is saved; on a GPU it also
  saves one kernel launch per parameter.

Run: ``python benchmarks/precision.py`` (about 2½ minutes on 2 idle cores, plus 1–2 minutes of
inductor compilation on a first run; later runs reuse inductor's cache). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from sklearn.datasets import load_digits

from rf.coupling import generate_pairs, pair_distance
from rf.models import EMA, build_model
from rf.noise import STREAMS, noise, uniform
from rf.paths import StraightPath
from rf.solvers import Solver
from rf.training import VelocityTrainer

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"
SEED, SEED_PAIRS, WARMUP = 0, 1, 3
WIDE = {"base_channels": 64, "num_res_blocks": 2}


def digits(resolution: int) -> torch.Tensor:
    """All 1,797 digits (grey values 0…16) as float32 (N, 1, resolution, resolution) in [−1, 1]."""
    images = torch.from_numpy(load_digits().images).float().div(8.0).sub(1.0)[:, None]
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)


def batch(images: torch.Tensor, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, x1, t) of step ``step``: noise and times by example id, digits in a fixed order."""
    ids = np.arange(step * size, (step + 1) * size)
    x0 = noise(SEED, ids, tuple(images.shape[1:]), stream=STREAMS.x0)
    return x0, images[torch.from_numpy(ids % len(images))], uniform(SEED, ids, stream=STREAMS.time)


def trainer(settings: dict[str, Any], compile: bool = False) -> VelocityTrainer:
    torch.manual_seed(SEED)
    model = build_model(settings["model"]["kind"], settings["model"]["config"])
    train = settings["train"]
    return VelocityTrainer(
        model,
        StraightPath(),
        lr=train["lr"],
        warmup_steps=train["warmup_steps"],
        ema_decay=train["ema_decay"],
        compile=compile,
    )


def steps_per_second(run: VelocityTrainer, images: torch.Tensor, first: int, steps: int, size: int) -> float:
    """Rate of steps ``first`` … ``first + steps − 1``; the loss is read once, at the end."""
    started = time.perf_counter()
    for step in range(first, first + steps):
        loss = run.step(*batch(images, step, size))
    float(loss)
    return steps / (time.perf_counter() - started)


def bf16_against_fp32(model: torch.nn.Module, solver: Solver, x0: torch.Tensor) -> tuple[float, float, float]:
    """(mean ‖Z1_bf16 − Z1_fp32‖ ÷ mean ‖Z1_fp32 − Z0‖, mean NFE fp32, mean NFE bf16)."""
    fp32 = generate_pairs(model, solver, x0, chunk=len(x0))
    bf16 = generate_pairs(model, solver, x0, chunk=len(x0), autocast_dtype=torch.bfloat16)
    return pair_distance(x0, fp32.x1, bf16.x1), float(fp32.nfe.double().mean()), float(bf16.nfe.double().mean())


@torch.no_grad()
def loop_update(ema: EMA, model: torch.nn.Module) -> None:
    """The per-tensor loop that :meth:`EMA.update` replaced (the baseline)."""
    for average, current in zip(ema.model.parameters(), model.parameters()):
        average.lerp_(current.detach(), 1.0 - ema.decay)


def updates_per_second(
    update: Callable[[EMA, torch.nn.Module], None], ema: EMA, model: torch.nn.Module, n: int
) -> float:
    started = time.perf_counter()
    for _ in range(n):
        update(ema, model)
    return n / (time.perf_counter() - started)


def fused_over_loop(model: torch.nn.Module, n: int) -> float:
    """Fused ÷ loop EMA updates/s, arms in the order fused, loop, loop, fused (drift cancels)."""
    ema = EMA(model, 0.999)
    rates: dict[str, list[float]] = {"fused": [], "loop": []}
    for arm in ("fused", "loop", "loop", "fused"):
        update = EMA.update if arm == "fused" else loop_update
        rates[arm].append(updates_per_second(update, ema, model, n))
    return sum(rates["fused"]) / sum(rates["loop"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the field")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--timed-steps", type=int, default=20, help="steps per compile/eager arm")
    parser.add_argument("--ema-updates", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = yaml.safe_load(CONFIG.read_text())
    config = settings["model"]["config"]
    images = digits(config["resolution"])
    size = settings["train"]["batch_size"]

    eager = trainer(settings)
    started = time.perf_counter()
    steps_per_second(eager, images, 0, args.steps, size)
    print(f"trained the digits UNet for {args.steps} steps in {time.perf_counter() - started:.0f} s", flush=True)

    compiled = trainer(settings, compile=True)
    started = time.perf_counter()
    steps_per_second(compiled, images, 0, WARMUP, size)
    warmup = time.perf_counter() - started
    print(f"compile warm-up ({WARMUP} steps, excluded): {warmup:.0f} s", flush=True)
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for arm in ("eager", "compiled", "eager", "compiled"):
        run = eager if arm == "eager" else compiled
        rates[arm].append(steps_per_second(run, images, run.step_count, args.timed_steps, size))
    compile_ratio = sum(rates["compiled"]) / sum(rates["eager"])
    print(f"training steps/s: eager {rates['eager']}, compiled {rates['compiled']}", flush=True)

    model = eager.ema.model.eval()
    x0 = noise(SEED_PAIRS, np.arange(args.pairs), (config["in_channels"], config["resolution"], config["resolution"]))
    distances, nfe = {}, {}
    for name in ("rk45@1e-5", "euler@1"):
        started = time.perf_counter()
        distances[name], fp32_nfe, bf16_nfe = bf16_against_fp32(model, Solver.parse(name), x0)
        if name.startswith("rk45"):
            nfe = {"fp32": fp32_nfe, "bf16": bf16_nfe}
        print(
            f"{name}: bf16 vs fp32 distance {distances[name]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True
        )

    ema_ratio = {
        "digits_unet": fused_over_loop(model, args.ema_updates),
        "wide_unet": fused_over_loop(build_model("unet", {**config, **WIDE}), args.ema_updates // 4),
    }
    print(
        json.dumps(
            {
                "bf16_vs_fp32_pair_distance": {name: round(value, 5) for name, value in distances.items()},
                "rk45_nfe": {name: round(value, 1) for name, value in nfe.items()},
                "compile_vs_eager_steps": round(compile_ratio, 3),
                "fused_ema_vs_loop": {name: round(value, 3) for name, value in ema_ratio.items()},
                "eager_steps_per_s": round(sum(rates["eager"]) / 2, 2),
                "compile_warmup_s": round(warmup, 1),
                "pairs": args.pairs,
                "train_steps": args.steps,
            }
        )
    )


if __name__ == "__main__":
    main()
