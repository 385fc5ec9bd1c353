"""One optimisation step of a velocity field, shared by 1-RF, reflow and distillation.

They differ only in where (X0, X1) come from and how t is drawn; the step is always

    lr_k = lr · min(1, (k + 1) / warmup)
    L = E_i loss(v(X_t, t), dX_t/dt)                  (see :func:`rf.losses.velocity_loss`)
    θ ← Adam(θ, clip(∇L, grad_clip));  θ_ema ← d·θ_ema + (1 − d)·θ

A non-finite loss raises :class:`NonFiniteLossError` before any weight changes, so the last
good state stays intact.
"""

from __future__ import annotations

import contextlib
import torch
import torch.distributed as dist
from torch import nn

from rf.losses import Loss, l2, velocity_loss
from rf.models import EMA
from rf.paths import ProbabilityPath


class NonFiniteLossError(FloatingPointError):
    """The loss (or the batch behind it) was NaN or infinite at ``step``."""

    def __init__(self, step: int, detail: str):
        super().__init__(f"non-finite loss at step {step}: {detail}")
        self.step = step
        self.detail = detail


def _all_ranks_finite(*values: torch.Tensor) -> bool:
    """True when ``values`` are finite on every rank (one all-reduce when distributed), so that
    all ranks stop together instead of one hanging in the gradient all-reduce."""
    flag = torch.stack([torch.isfinite(v).all() for v in values]).all().to(torch.float32).reshape(1)
    value = values[0]
    if dist.is_available() and dist.is_initialized():
        flag = flag.to(value.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


class VelocityTrainer:
    """Holds the model, its EMA, the optimizer and the step count.

    ``model`` is the network whose weights are trained and averaged; ``forward_model`` (default:
    ``model``) is what computes the loss, e.g. its DistributedDataParallel wrapper.
    """

    def __init__(
        self,
        model: nn.Module,
        path: ProbabilityPath,
        loss: Loss = l2,
        lr: float = 2e-4,
        warmup_steps: int = 0,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.999,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        forward_model: nn.Module | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.model = model
        self.forward_model = forward_model or model
        self.path = path
        self.loss = loss
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.ema = EMA(model, ema_decay)
        self.step_count = 0

    def learning_rate(self, step: int) -> float:
        """Linear warmup to ``lr`` over ``warmup_steps``, constant after."""
        if self.warmup_steps == 0:
            return self.lr
        return self.lr * min(1.0, (step + 1) / self.warmup_steps)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def step(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> float:
        """One optimisation step on a batch; returns the loss."""
        if not _all_ranks_finite(x0, x1):
            raise NonFiniteLossError(self.step_count, "the batch contains NaN or inf values")
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step_count)
        with self._autocast(x0.device):
            loss = velocity_loss(self.forward_model, self.path, x0, x1, t, self.loss)
        if not _all_ranks_finite(loss.detach()):
            raise NonFiniteLossError(self.step_count, f"loss = {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step_count += 1
        return float(loss.detach())
