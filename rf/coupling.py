"""Reflow couplings: pair i is (Z0_i, Flow(Z0_i)), a pure function of (model, solver, seed, i).

Two things make a pair independent of how ids are grouped:
1. Z0_i is drawn by id (``noise(seed, i)`` from the counter-based generator of :mod:`rf.noise`,
   or a toy distribution's ``sample(seed, i)``);
2. :class:`FixedShapeVelocity` only ever calls the network on batches of one fixed size
   (zero-padded), so the matrix kernels, and hence the bits of each row, never change with the
   number of samples being solved together; the per-sample RK45 of :mod:`rf.solvers` does the
   rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rf.solvers import Solver


class FixedShapeVelocity:
    """v(x, t) = model(x, t), evaluated in zero-padded chunks of exactly ``chunk`` rows.

    Rows of a network's output depend only on their own input row, but the floating-point
    kernels chosen for a matrix product depend on its shape; a fixed shape makes every row's
    result bitwise reproducible whatever the batch it came in.
    """

    def __init__(self, model: nn.Module, chunk: int = 256):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model = model
        self.chunk = chunk

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, x.shape[0], self.chunk):
            xs, ts = x[start : start + self.chunk], t[start : start + self.chunk]
            rows = xs.shape[0]
            if rows < self.chunk:
                xs = torch.cat([xs, xs.new_zeros((self.chunk - rows, *xs.shape[1:]))])
                ts = torch.cat([ts, ts.new_zeros(self.chunk - rows)])
            outputs.append(self.model(xs, ts)[:rows])
        return torch.cat(outputs) if outputs else x.new_zeros(x.shape)


@dataclass
class Pairs:
    """A batch of coupling pairs with the evaluations each one took."""

    x0: torch.Tensor
    x1: torch.Tensor
    nfe: torch.Tensor


@torch.inference_mode()
def generate_pairs(
    model: nn.Module,
    solver: Solver,
    x0: torch.Tensor,
    chunk: int = 256,
    device: str | torch.device = "cpu",
) -> Pairs:
    """Z1 = solver(model, Z0) for Z0 = ``x0``; returned on the CPU.

    For pairs that are pure functions of their ids, draw ``x0`` by id (``rf.noise.noise(seed,
    ids, shape)``, or a toy's ``sample(seed, ids)``). ``model`` must be in eval mode (dropout
    would make pairs random)."""
    if model.training:
        raise ValueError("generate_pairs needs the model in eval mode (call model.eval())")
    solution = solver.solve(FixedShapeVelocity(model, chunk), x0.to(device))
    return Pairs(x0.cpu(), solution.x.cpu(), solution.nfe.cpu())
