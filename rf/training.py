"""One optimisation step of a velocity field, shared by 1-RF, reflow and distillation.

They differ only in where (X0, X1) come from and how t is drawn; the step is always

    lr_k = lr · min(1, (k + 1) / warmup)
    L = E_i loss(v(X_t, t), dX_t/dt)                  (see :func:`rf.losses.velocity_loss`)
    θ ← Adam(θ, clip(∇L, grad_clip));  θ_ema ← d·θ_ema + (1 − d)·θ

**Gradient accumulation** (``grad_accumulation = A``): the batch of B examples is cut into A
micro-batches of B/A, each one's mean loss is scaled by 1/A and back-propagated, so the summed
gradient is ∇ of the mean over all B examples — the same step as one pass over the whole batch,
with 1/A of the activation memory. Under DistributedDataParallel the gradient all-reduce runs
only on the last micro-batch (``no_sync()`` on the others). One call of :meth:`step` is one
optimizer step whatever A is.

**channels_last**: the model's 4-D weights and the 4-D inputs use ``torch.channels_last``
(NHWC) memory, which tensor-core convolutions prefer; the numbers are those of the default
layout up to float rounding. Convert the model before wrapping it in DDP (or let this class do
it when there is no wrapper).

A non-finite loss raises :class:`NonFiniteLossError` before any weight changes, so the last
good state stays intact.

**One host sync per step.** A GPU runs ahead of the Python that feeds it until Python asks for
a value (``.item()``, ``float(tensor)``, ``if tensor:``, a copy to the CPU); each such sync
drains the queue. :meth:`VelocityTrainer.step` makes exactly one, the check that must precede the
optimizer: the finiteness of the batch and of the loss are two flags of one tensor, all-reduced
once (MIN over ranks) and read with one ``tolist()``. Gradient clipping computes its scale
min(1, c / ‖g‖) on the device, Adam keeps its step counts on the CPU, the EMA is one
multi-tensor ``lerp``; the loss comes back as a 0-dim device tensor that the caller reads (one
more sync) only when it logs.

**compile** (opt-in): the forward model (the DDP wrapper, when there is one) is wrapped in
``torch.compile`` with the default mode: TorchInductor fuses the element-wise work (GroupNorm,
SiLU, residual sums, the loss) around the convolutions and matrix products. Not
``reduce-overhead``, whose CUDA graphs only remove kernel-launch latency (small next to a
UNet's kernels at training batch sizes) and keep a private memory pool per input shape; not
``max-autotune``, which spends minutes of autotuning per shape. ``model`` stays uncompiled, so
checkpoints keep their parameter names. The first steps pay the compilation.
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


def _all_ranks_finite(*groups: tuple[torch.Tensor, ...]) -> list[bool]:
    """For each group of tensors, whether all of them are finite on every rank.

    flag_g = min over ranks of ∏_{v ∈ g} [v is finite]: one flag tensor on the device, one
    all-reduce (MIN) when distributed, so that all ranks stop together instead of one hanging in
    the next gradient all-reduce, and one host sync (``tolist``) for all the groups."""
    flags = torch.stack([torch.stack([torch.isfinite(v).all() for v in group]).all() for group in groups])
    flags = flags.to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [flag > 0 for flag in flags.tolist()]


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
        grad_accumulation: int = 1,
        channels_last: bool = False,
        compile: bool = False,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        if isinstance(grad_accumulation, bool) or not isinstance(grad_accumulation, int) or grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be an integer >= 1, got {grad_accumulation!r}")
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place; a no-op when already converted
        self.model = model
        forward_model = forward_model or model
        self.forward_model = torch.compile(forward_model) if compile else forward_model
        self.path = path
        self.loss = loss
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self.grad_accumulation = grad_accumulation
        self.channels_last = channels_last
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

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on every micro-batch but the last."""
        no_sync = getattr(self.forward_model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def step(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a batch (in ``grad_accumulation`` micro-batches).

        Returns the mean loss over the batch as a detached float32 0-dim tensor on the batch's
        device; ``float(loss)`` costs a host sync, so read it only when logging."""
        parts = self.grad_accumulation
        if x0.shape[0] % parts:
            raise ValueError(
                f"a batch of {x0.shape[0]} examples does not split into grad_accumulation={parts} equal micro-batches"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step_count)
        self.optimizer.zero_grad(set_to_none=True)
        x0, x1 = self._layout(x0), self._layout(x1)
        total = torch.zeros((), device=x0.device)
        for index, (x0_part, x1_part, t_part) in enumerate(zip(x0.chunk(parts), x1.chunk(parts), t.chunk(parts))):
            with self._no_sync(index == parts - 1):
                with self._autocast(x0.device):
                    loss = velocity_loss(self.forward_model, self.path, x0_part, x1_part, t_part, self.loss) / parts
                loss.backward()
            total += loss.detach().float()
        # The one host sync of the step, on every rank after the backward passes (whose
        # all-reduce every rank joins) and before the optimizer: a non-finite batch or loss leaves
        # the weights untouched (the gradients it left are cleared by the next zero_grad).
        batch_finite, loss_finite = _all_ranks_finite((x0, x1), (total,))
        if not batch_finite:
            raise NonFiniteLossError(self.step_count, "the batch contains NaN or inf values")
        if not loss_finite:
            raise NonFiniteLossError(self.step_count, f"loss = {total.item()}")
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step_count += 1
        return total
