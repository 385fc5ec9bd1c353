"""Exponential moving average of model weights: θ_ema ← d·θ_ema + (1 − d)·θ after each step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps a frozen copy of ``model`` whose parameters track an EMA with decay ``decay``.

    Buffers are copied, not averaged. ``decay = 0`` makes the copy equal the model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ_ema ← lerp(θ_ema, θ, 1 − d) = θ_ema + (1 − d)·(θ − θ_ema) for every parameter at once.

        One multi-tensor ``lerp`` (``torch._foreach_lerp_``) replaces a Python loop of per-tensor
        ``lerp_`` calls: on a GPU it launches a handful of fused kernels instead of one per
        parameter; each element gets the same arithmetic as ``Tensor.lerp_``. Buffers are copied
        with one multi-tensor copy.
        """
        averages = list(self.model.parameters())
        if averages:
            torch._foreach_lerp_(averages, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
