"""Regression losses between a predicted and a target velocity, and the training objective.

Losses return one value per sample (shape (B,)); the objective averages them.

- L2: mean over dimensions of (v − u)², the paper's objective E‖(X1 − X0) − v(X_t, t)‖² / d.
- pseudo-Huber: √(‖v − u‖² + c²) − c (Song & Dhariwal 2023; rfpp), with c = 0.00054·√d by
  default for d-dimensional data. It is ≈ ‖v − u‖²/(2c) near 0 and ≈ ‖v − u‖ far away.
- LPIPS (the paper's choice for one-step distillation) compares *images*, not velocities: the
  endpoint each velocity points at from X_t along the straight path (:class:`EndpointLoss`)::

      x̂1 = X_t + (1 − t)·v(X_t, t)     against     x1 = X_t + (1 − t)·(X1 − X0) = X1

  so for one-step distillation (t = 0) it is LPIPS(X0 + v(X0, 0), X1).
- LPIPS-Huber (rfpp): t·H(v̂, v) + LPIPS(x̂1, x1), see :class:`rf.lpips.LPIPSHuberLoss`.

The LPIPS losses need network weights the user supplies (``weights``: a local file; nothing is
downloaded) and images of shape (B, C, H, W); they only make sense on the straight path.

The objective, TorchCFM-style, is one call::

    loss = velocity_loss(model, path, x0, x1, t)   # E_i loss(model(X_t, t), dX_t/dt)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rf.options.losses import DEFAULT_LPIPS_RESIZE, check_loss
from rf.paths import ProbabilityPath

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class VelocityField(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch dimensions."""
    return (pred - target).pow(2).flatten(1).mean(dim=1)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample √(‖pred − target‖² + c²) − c (the one place this formula is written)."""
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be positive, got {c}")
    return torch.sqrt((pred - target).flatten(1).pow(2).sum(dim=1) + c * c) - c


class PseudoHuber:
    """Per-sample :func:`pseudo_huber`; ``c=None`` picks 0.00054·√d (Song & Dhariwal 2023)."""

    def __init__(self, c: float | None = None):
        if c is not None and c <= 0:
            raise ValueError(f"pseudo-Huber c must be positive, got {c}")
        self.c = c

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c = self.c if self.c is not None else 0.00054 * math.sqrt(pred[0].numel())
        return pseudo_huber(pred, target, c)


class TrajectoryLoss(nn.Module):
    """A loss that also sees where on the path it is: per sample ``loss(v̂, v, x_t, t)``.

    :func:`velocity_loss` passes X_t and t to such losses. Being a module, it follows the model
    to its device (``loss.to(device)``)."""

    def forward(self, v_pred: torch.Tensor, v_target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def endpoint(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x_t + (1 − t)·velocity: where a straight step from (x_t, t) with ``velocity`` lands at t = 1."""
    remaining = (1.0 - t).reshape(-1, *([1] * (x_t.dim() - 1))).to(velocity.dtype)
    return x_t + remaining * velocity


class EndpointLoss(TrajectoryLoss):
    """``image_loss(x̂1, x1)`` with x̂1 = x_t + (1 − t)·v̂ and x1 = x_t + (1 − t)·v.

    On the straight path X_t = t·X1 + (1 − t)·X0 the target velocity is v = X1 − X0, so x1 = X1
    exactly and x̂1 is the model's prediction of X1; at t = 0 (one-step distillation) x̂1 is
    X0 + v(X0, 0), the one-step sample."""

    def __init__(self, image_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.image_loss = image_loss

    def forward(self, v_pred: torch.Tensor, v_target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.image_loss(endpoint(x_t, t, v_pred), endpoint(x_t, t, v_target))


class _Trajectory(TrajectoryLoss):
    """A ``(v̂, v, x_t, t)`` callable (e.g. :class:`rf.lpips.LPIPSHuberLoss`) as a TrajectoryLoss."""

    def __init__(self, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.loss = loss

    def forward(self, v_pred: torch.Tensor, v_target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.loss(v_pred, v_target, x_t, t)


def make_loss(name: str, weights: str | Path | None = None, **options: float) -> Loss:
    """``l2``, ``pseudo_huber`` (option ``c``), ``lpips`` (option ``resize``, default 224; 0 keeps
    the size) or ``lpips_huber`` (options ``c``, ``resize``) — the last two with the LPIPS network
    loaded from the local file ``weights``."""
    canonical = check_loss(name, options, weights)
    if canonical == "l2":
        return l2
    if canonical == "pseudo_huber":
        return PseudoHuber(**options)
    from rf.lpips import LPIPSHuberLoss, LPIPSLoss, load_lpips

    resize = int(options.get("resize", DEFAULT_LPIPS_RESIZE)) or None
    lpips = load_lpips(weights, resize=resize)
    if canonical == "lpips":
        return EndpointLoss(LPIPSLoss(lpips))
    return _Trajectory(LPIPSHuberLoss(lpips, c=options.get("c")))


def velocity_loss(
    model: VelocityField,
    path: ProbabilityPath,
    x0: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    loss: Loss = l2,
) -> torch.Tensor:
    """E over the batch of loss(v(X_t, t), dX_t/dt) with (X_t, dX_t/dt) from ``path`` (a
    :class:`TrajectoryLoss` also gets X_t and t)."""
    xt, target = path.sample(x0, x1, t)
    pred = model(xt, t)
    if isinstance(loss, TrajectoryLoss):
        return loss(pred, target, xt, t).mean()
    return loss(pred, target).mean()
