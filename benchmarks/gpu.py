"""GPU check for one H200 (at most ~5 minutes): pair generation and training throughput, fp32 against
bf16, eager against compiled, peak memory and host syncs. Prints one JSON line.

Arms, each in its own subprocess with a deadline (a slow compilation or an out-of-memory error
costs that arm only, and each arm's peak memory is its own):

- ``pairs`` — the CIFAR-10 UNet (``configs/cifar10.yaml``'s model, ≈62M parameters). Its output
  layers start at zero (v ≡ 0, which RK45 solves in a few steps), so it is first trained briefly
  (``PAIRS_TRAIN_SECONDS``, bf16, batch 128) on synthetic smooth images (bicubic-upsampled 4×4
  noise through tanh): a curved field, not CIFAR-10's, so its RK45 NFE is not the paper's ~127.
  Then :func:`rf.coupling.generate_pairs` with the config's ``couple.forward_batch`` as chunk
  and batch, at rk45@1e-5 and euler@1, in fp32 (TF32 on) and bf16 autocast (network only; states
  fp32): pairs/s over the batches that fit the arm's time box after a warm-up call, mean NFE,
  peak memory. ``bf16_vs_fp32_pair_distance`` = mean ‖Z1_bf16 − Z1_fp32‖ ÷ mean ‖Z1_fp32 − Z0‖
  on the first batch. ``pinned_copy_equals_blocking`` checks that the non-blocking pinned-memory
  copies of ``generate_pairs`` give the bits of a plain blocking solve.
- ``train_eager`` / ``train_compile`` — the 256² UNet (``configs/lsun_church256.yaml``'s model,
  ≈65M parameters): :class:`rf.training.VelocityTrainer` steps under bf16 autocast,
  channels_last, micro-batch ``TRAIN_BATCH``, ``compile`` off and on. ``warmup_s`` (the first
  ``WARMUP`` steps, compilation included) is excluded from ``images_per_s``.
  ``host_syncs_per_step`` counts CUDA's synchronising calls over two steps
  (``torch.cuda.set_sync_debug_mode("warn")``): 1 expected, the finite check.

TF32: ``torch.set_float32_matmul_precision("high")`` and ``cudnn.allow_tf32 = True`` in every arm;
they only change float32 matrix products and convolutions, i.e. the fp32 arms. cuDNN autotuning
(``cudnn.benchmark``) stays off, as in the pipeline.

Run: ``python benchmarks/gpu.py`` on a machine with one CUDA GPU. ``--dry-run`` runs every arm at
tiny sizes on the CPU (to check the script, not to measure). Without a GPU and without
``--dry-run`` it stops at once with a message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from rf.coupling import FixedShapeVelocity, generate_pairs, pair_distance
from rf.models import build_model
from rf.noise import noise
from rf.paths import StraightPath
from rf.solvers import Solver
from rf.training import VelocityTrainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BUDGET_S, KILL_GRACE_S = 285, 10
ARMS = {"pairs": 110, "train_eager": 40, "train_compile": 150}  # time boxes, seconds; the last gets what is left
PAIRS_TRAIN_SECONDS, PAIRS_TRAIN_BATCH, SOLVERS = 25.0, 128, ("rk45@1e-5", "euler@1")
TRAIN_BATCH, WARMUP, TIMED_STEPS = 16, 3, 20
TINY = {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8]}
GIB = 2**30


Emit = Callable[[dict[str, Any]], None]


def load(name: str, dry_run: bool) -> dict[str, Any]:
    """The pipeline YAML ``configs/{name}``; in a dry run its model shrunk by ``TINY``."""
    settings = yaml.safe_load((CONFIGS / name).read_text())
    settings["model"]["config"].update(TINY if dry_run else {})
    return settings


def smooth_images(n: int, config: dict[str, Any], device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Synthetic π1: bicubic-upsampled 4×4 Gaussian noise through tanh, in (−1, 1)."""
    coarse = torch.randn(n, config["in_channels"], 4, 4, device=device, generator=generator)
    return F.interpolate(coarse, size=config["resolution"], mode="bicubic", align_corners=False).tanh()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def finish(device: torch.device) -> None:
    """Waits for the device's queued work, so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pairs_arm(device: torch.device, deadline: float, dry_run: bool, emit: Emit) -> None:
    settings = load("cifar10.yaml", dry_run)
    config, chunk = settings["model"]["config"], 4 if dry_run else settings["couple"]["forward_batch"]
    torch.manual_seed(0)
    trainer = VelocityTrainer(
        build_model("unet", config).to(device),
        StraightPath(),
        lr=2e-4,
        autocast_dtype=torch.bfloat16,
        channels_last=True,
    )
    generator = torch.Generator(device).manual_seed(0)
    started, train_steps = time.perf_counter(), 0
    train_seconds, batch = (1.0, 4) if dry_run else (PAIRS_TRAIN_SECONDS, PAIRS_TRAIN_BATCH)
    while time.perf_counter() - started < train_seconds:
        x1 = smooth_images(batch, config, device, generator)
        loss = trainer.step(
            torch.randn(x1.shape, device=device, generator=generator),
            x1,
            torch.rand(batch, device=device, generator=generator),
        )
        train_steps += 1
    model = trainer.model.eval()  # not the EMA: at the config's decay it has hardly moved yet
    shape = (config["in_channels"], config["resolution"], config["resolution"])
    box = 1.0 if dry_run else 0.9 * (deadline - time.perf_counter()) / (2 * len(SOLVERS))
    result: dict[str, Any] = {"train_steps": train_steps, "train_loss": round(float(loss), 4), "chunk": chunk}
    first: dict[tuple[str, str], torch.Tensor] = {}
    x0 = noise(1, np.arange(chunk), shape)
    one_step = Solver.parse("euler@1")
    for name in SOLVERS:
        solver, result[name] = Solver.parse(name), {}
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            options = {"chunk": chunk, "device": device, "autocast_dtype": dtype}
            generate_pairs(model, one_step, x0, **options)  # warm-up: kernels, library handles
            reset_peak(device)
            arm_started, pairs, nfe = time.perf_counter(), 0, []
            while not pairs or time.perf_counter() - arm_started < box:
                solved = generate_pairs(model, solver, noise(1, np.arange(pairs, pairs + chunk), shape), **options)
                first.setdefault((name, precision), solved.x1)
                pairs, nfe = pairs + chunk, nfe + solved.nfe.tolist()
            seconds = time.perf_counter() - arm_started
            result[name][precision] = {
                "pairs_per_s": round(pairs / seconds, 2),
                "pairs": pairs,
                "nfe": round(float(np.mean(nfe)), 1),
                "peak_gib": peak_gib(device),
            }
            emit(result)
    result["bf16_vs_fp32_pair_distance"] = {
        name: round(pair_distance(x0, first[name, "fp32"], first[name, "bf16"]), 5) for name in SOLVERS
    }
    with torch.inference_mode():
        blocking = one_step.solve(FixedShapeVelocity(model, chunk), x0.to(device)).x.cpu()
    pinned = generate_pairs(model, one_step, x0, chunk=chunk, device=device).x1
    result["pinned_copy_equals_blocking"] = torch.equal(pinned, blocking)
    emit(result)


def host_syncs(trainer: VelocityTrainer, batch: tuple[torch.Tensor, ...], steps: int) -> float | None:
    """Synchronising CUDA calls per step, as reported by CUDA's sync debug mode (None on CPU)."""
    if not batch[0].is_cuda:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                trainer.step(*batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def train_arm(device: torch.device, deadline: float, dry_run: bool, compile: bool, emit: Emit) -> None:
    loaded = load("lsun_church256.yaml", dry_run)
    config, settings = loaded["model"]["config"], loaded["train"]
    torch.manual_seed(0)
    model = build_model("unet", config).to(device)
    trainer = VelocityTrainer(
        model,
        StraightPath(),
        lr=settings["lr"],
        warmup_steps=settings["warmup_steps"],
        grad_clip=settings["grad_clip"],
        ema_decay=settings["ema_decay"],
        autocast_dtype=torch.bfloat16,
        channels_last=True,
        compile=compile,
    )
    size = 2 if dry_run else TRAIN_BATCH
    generator = torch.Generator(device).manual_seed(0)
    x1 = smooth_images(size, config, device, generator)
    batch = (
        torch.randn(x1.shape, device=device, generator=generator),
        x1,
        torch.rand(size, device=device, generator=generator),
    )
    reset_peak(device)
    started = time.perf_counter()
    for _ in range(WARMUP):
        trainer.step(*batch)
    finish(device)
    warmup = time.perf_counter() - started
    emit({"warmup_s": round(warmup, 1)})
    syncs = host_syncs(trainer, batch, 2)
    started, steps = time.perf_counter(), 0
    while steps < TIMED_STEPS and (steps < 2 or time.perf_counter() < deadline - 5):
        loss = trainer.step(*batch)
        steps += 1
    float(loss)  # the one sync of the timed loop: its queued work is in the time
    seconds = time.perf_counter() - started
    emit(
        {
            "images_per_s": round(steps * size / seconds, 2),
            "steps": steps,
            "micro_batch": size,
            "warmup_s": round(warmup, 1),
            "host_syncs_per_step": syncs,
            "peak_gib": peak_gib(device),
        }
    )


def run_arm(name: str, deadline: float, dry_run: bool) -> None:
    """Runs arm ``name``, printing its results so far as a JSON line after each part."""
    device = torch.device("cpu" if dry_run else "cuda")
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True

    def emit(result: dict[str, Any]) -> None:
        print(json.dumps(result), flush=True)

    if name == "pairs":
        pairs_arm(device, deadline, dry_run, emit)
    else:
        train_arm(device, deadline, dry_run, name == "train_compile", emit)


def arm_in_subprocess(name: str, seconds: float, dry_run: bool) -> dict[str, Any]:
    """The last JSON line that ``--arm name`` printed within ``seconds`` (plus a grace to stop),
    marked ``timed_out`` when it had to be killed, or its error."""
    command = [sys.executable, __file__, "--arm", name, "--deadline", str(time.time() + seconds)]
    try:
        done = subprocess.run(
            command + (["--dry-run"] if dry_run else []), capture_output=True, timeout=seconds + KILL_GRACE_S
        )
        output, extra = (
            done.stdout,
            {} if done.returncode == 0 else {"error": done.stderr.decode().strip().splitlines()[-3:]},
        )
    except subprocess.TimeoutExpired as stopped:
        output, extra = stopped.stdout or b"", {"timed_out": True, "limit_s": round(seconds)}
    lines = output.decode().strip().splitlines()
    return {**(json.loads(lines[-1]) if lines else {}), **extra}


def versions() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "tf32": {"float32_matmul_precision": "high", "cudnn_allow_tf32": True, "applies_to": "fp32 arms"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every arm at tiny sizes on the CPU")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(
            f"benchmarks/gpu.py needs a CUDA GPU, and torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda}) sees none. Run it on the GPU machine, or with --dry-run to check "
            "it on the CPU at tiny sizes."
        )
    if args.arm:
        # the parent's wall-clock deadline, as seconds left on this process's monotonic clock
        deadline = time.perf_counter() + args.deadline - time.time()
        run_arm(args.arm, deadline, args.dry_run)
        return
    started = time.time()
    result: dict[str, Any] = {"dry_run": args.dry_run, **versions()}
    for name, box in ARMS.items():
        left = BUDGET_S - (time.time() - started)
        result[name] = arm_in_subprocess(name, min(box, left), args.dry_run)
        print(f"{name}: {json.dumps(result[name])}", file=sys.stderr, flush=True)
    eager, compiled = result["train_eager"], result["train_compile"]
    if "images_per_s" in eager and "images_per_s" in compiled:
        result["compile_vs_eager_images"] = round(compiled["images_per_s"] / eager["images_per_s"], 3)
    result["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
