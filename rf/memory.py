"""How many samples fit in an inference batch: activation memory per sample, counted on the meta
device (no memory, no compute).

``activation_bytes(model, shape)`` runs one forward pass of a single example on the meta device
and sums the bytes of every module's output tensors: an upper bound of what inference keeps alive
at once (it frees most of them on the way), so a batch chosen from it is safe.
``inference_batch(model, shape, budget, cap)`` = clamp(budget ÷ that, 1, cap).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def activation_bytes(model: nn.Module, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of all module outputs of one forward pass on one example of ``shape``."""
    meta = copy.deepcopy(model).to("meta")
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()

    hooks = [module.register_forward_hook(count) for module in meta.modules()]
    try:
        with torch.inference_mode():
            meta(torch.zeros(1, *shape, device="meta", dtype=dtype), torch.zeros(1, device="meta", dtype=dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def inference_batch(model: nn.Module, shape: Sequence[int], budget_bytes: int, cap: int = 256) -> int:
    """The largest batch whose activations (:func:`activation_bytes`) fit ``budget_bytes``, in [1, cap]."""
    per_sample = max(1, activation_bytes(model, shape))
    return max(1, min(cap, budget_bytes // per_sample))
