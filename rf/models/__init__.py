"""Velocity networks v(x, t) and their registry: a model is rebuilt from ``{"kind", "config"}``."""

from __future__ import annotations

from typing import Any

from torch import nn

from rf.models.ema import EMA
from rf.models.mlp import MLPVelocity
from rf.models.unet import UNet
from rf.registry import construct

MODELS: dict[str, type[nn.Module]] = {"mlp": MLPVelocity, "unet": UNet}


def build_model(kind: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A fresh model of ``kind`` (``mlp`` or ``unet``) with constructor ``config``;
    ``build_model(**model_spec(m))`` rebuilds m's architecture."""
    return construct(MODELS, kind, "model kind", **(config or {}))


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"kind", "config"}`` such that ``build_model(**spec)`` rebuilds ``model``'s architecture."""
    for kind, cls in MODELS.items():
        if type(model) is cls:
            return {"kind": kind, "config": model.config()}
    raise TypeError(f"{type(model).__name__} is not a registered velocity model")


def input_shape(model: nn.Module) -> list[int]:
    """The shape of one example ``model`` takes: [dim] for an MLP, [C, H, W] for a UNet."""
    if isinstance(model, (MLPVelocity, UNet)):
        return model.options.input_shape
    raise TypeError(f"{type(model).__name__} is not a registered velocity model")


__all__ = ["EMA", "MLPVelocity", "UNet", "MODELS", "build_model", "input_shape", "model_spec"]
