"""Regression losses between a predicted and a target velocity, and the training objective.

Losses return one value per sample (shape (B,)); the objective averages them.

- L2: mean over dimensions of (v − u)², the paper's objective E‖(X1 − X0) − v(X_t, t)‖² / d.
- pseudo-Huber: √(‖v − u‖² + c²) − c (Song & Dhariwal 2023; rfpp), with c = 0.00054·√d by
  default for d-dimensional data. It is ≈ ‖v − u‖²/(2c) near 0 and ≈ ‖v − u‖ far away.

The objective, TorchCFM-style, is one call::

    loss = velocity_loss(model, path, x0, x1, t)   # E_i loss(model(X_t, t), dX_t/dt)
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

from rf.paths import ProbabilityPath

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class VelocityField(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch dimensions."""
    return (pred - target).pow(2).flatten(1).mean(dim=1)


class PseudoHuber:
    """Per-sample √(‖pred − target‖² + c²) − c; ``c=None`` picks 0.00054·√d."""

    def __init__(self, c: float | None = None):
        if c is not None and c <= 0:
            raise ValueError(f"pseudo-Huber c must be positive, got {c}")
        self.c = c

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = (pred - target).flatten(1)
        c = self.c if self.c is not None else 0.00054 * math.sqrt(diff.shape[1])
        return torch.sqrt(diff.pow(2).sum(dim=1) + c * c) - c


def make_loss(name: str, **options: float) -> Loss:
    """``l2`` or ``pseudo_huber`` (option ``c``)."""
    if name == "l2":
        if options:
            raise ValueError(f"the l2 loss takes no options, got {sorted(options)}")
        return l2
    if name == "pseudo_huber":
        return PseudoHuber(**options)
    raise ValueError(f"unknown loss {name!r}; choose 'l2' or 'pseudo_huber'")


def velocity_loss(
    model: VelocityField,
    path: ProbabilityPath,
    x0: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    loss: Loss = l2,
) -> torch.Tensor:
    """E over the batch of loss(v(X_t, t), dX_t/dt) with (X_t, dX_t/dt) from ``path``."""
    xt, target = path.sample(x0, x1, t)
    return loss(model(xt, t), target).mean()
