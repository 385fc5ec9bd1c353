"""Reflow couplings: pair i is (Z0_i, Flow(Z0_i)), a pure function of (model, solver, seed, i).

Two things make a pair independent of how ids are grouped:
1. Z0_i is drawn by id (``noise(seed, i)`` from the counter-based generator of :mod:`rf.noise`,
   or a toy distribution's ``sample(seed, i)``);
2. :class:`FixedShapeVelocity` only ever calls the network on batches of one fixed size
   (zero-padded), so the matrix kernels, and hence the bits of each row, never change with the
   number of samples being solved together; the per-sample RK45 of :mod:`rf.solvers` does the
   rest.

Precision and compilation are part of what a pair is a function of: with ``autocast_dtype``
(e.g. ``torch.bfloat16``) the network runs under autocast and its velocity is cast back to the
state's float32, so only v(Z, t) is rounded to bf16 while every solver update
Z ← Z + h·Σ bᵢkᵢ, the error control and the times stay float32/float64; with ``compile`` the
network is a ``torch.compile`` graph. Both keep the fixed-shape property (one kernel choice per
chunk shape), so pairs stay batch-invariant for a given (teacher, solver, seed, id, precision,
compile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rf.solvers import Solver, Velocity


class FixedShapeVelocity:
    """v(x, t) = model(x, t), evaluated in zero-padded chunks of exactly ``chunk`` rows.

    Rows of a network's output depend only on their own input row, but the floating-point
    kernels chosen for a matrix product depend on its shape; a fixed shape makes every row's
    result bitwise reproducible whatever the batch it came in.

    ``autocast_dtype``: evaluate the network under ``torch.autocast(x.device.type, dtype)``; the
    velocity is returned in ``x``'s dtype. ``compile``: call ``torch.compile(model,
    dynamic=False)`` instead of ``model``. Fixed-shape chunks are what static-shape compilation
    wants: every call has the shape (chunk, ...), so the graph is specialised to that shape and
    never recompiled, however many samples an adaptive solver still has active. Default mode:
    ``reduce-overhead`` (CUDA graphs) would suit fixed shapes too, but it only removes launch
    latency, and its outputs live in a graph-owned pool that the next replay overwrites.
    """

    def __init__(
        self,
        model: Velocity,
        chunk: int = 256,
        autocast_dtype: torch.dtype | None = None,
        compile: bool = False,
    ):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model = torch.compile(model, dynamic=False) if compile else model
        self.chunk = chunk
        self.autocast_dtype = autocast_dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, x.shape[0], self.chunk):
            xs, ts = x[start : start + self.chunk], t[start : start + self.chunk]
            rows = xs.shape[0]
            if rows < self.chunk:
                xs = torch.cat([xs, xs.new_zeros((self.chunk - rows, *xs.shape[1:]))])
                ts = torch.cat([ts, ts.new_zeros(self.chunk - rows)])
            with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                velocity = self.model(xs, ts)
            outputs.append(velocity[:rows].to(x.dtype))
        return torch.cat(outputs) if outputs else x.new_zeros(x.shape)


@dataclass
class Pairs:
    """A batch of coupling pairs with the evaluations each one took."""

    x0: torch.Tensor
    x1: torch.Tensor
    nfe: torch.Tensor


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; to a GPU through pinned host memory without blocking the host (the
    copy is ordered on the current stream before the kernels that read it)."""
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` on the CPU. From a GPU: non-blocking copies into pinned memory, then one
    synchronisation of the current stream, since a non-blocking device → host copy is complete
    (and safe to read) only once the stream has reached it."""
    hosts = [
        torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True) if x.is_cuda else x.cpu()
        for x in tensors
    ]
    for device in {x.device for x in tensors if x.is_cuda}:
        torch.cuda.current_stream(device).synchronize()
    return hosts


@torch.inference_mode()
def generate_pairs(
    model: nn.Module,
    solver: Solver,
    x0: torch.Tensor,
    chunk: int = 256,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> Pairs:
    """Z1 = solver(model, Z0) for Z0 = ``x0``; returned on the CPU.

    For pairs that are pure functions of their ids, draw ``x0`` by id (``rf.noise.noise(seed,
    ids, shape)``, or a toy's ``sample(seed, ids)``). ``model`` must be in eval mode (dropout
    would make pairs random). ``autocast_dtype`` and ``compile`` are those of
    :class:`FixedShapeVelocity`: only the network runs in ``autocast_dtype``, the states are
    those of ``x0`` (float32). On a GPU, ``x0`` goes over and Z1 comes back through pinned memory."""
    if model.training:
        raise ValueError("generate_pairs needs the model in eval mode (call model.eval())")
    velocity = FixedShapeVelocity(model, chunk, autocast_dtype=autocast_dtype, compile=compile)
    solution = solver.solve(velocity, _to_device(x0, torch.device(device)))
    x1, nfe = _to_host(solution.x, solution.nfe)
    return Pairs(x0.cpu(), x1, nfe)


def pair_distance(x0: torch.Tensor, x1: torch.Tensor, other_x1: torch.Tensor) -> float:
    """mean_i ‖x1'_i − x1_i‖ ÷ mean_i ‖x1_i − x0_i‖ for x1' = ``other_x1``: how far the same Z0
    solved another way (another precision, solver or compiler) lands from ``x1``, as a fraction
    of the mean transport length ‖Z1 − Z0‖ (norms over all non-batch dimensions)."""
    error = (other_x1 - x1).flatten(1).norm(dim=1).mean()
    return float(error / (x1 - x0).flatten(1).norm(dim=1).mean())
