"""LPIPS (Zhang et al. 2018, VGG variant) and LPIPS-based training losses, in plain torch.

Distance between images x, y in [−1, 1] of shape (N, 3, H, W) (one channel is repeated)::

    s(x) = (x − shift) / scale                      (shift, scale: the LPIPS scaling layer)
    f_l  = VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3   (l = 0..4)
    f̂_l  = f_l / (‖f_l‖_channels + 1e-10)          (unit norm along channels, per pixel)
    LPIPS(x, y) = Σ_l mean_{h,w} Σ_c w_{l,c} (f̂_l(x) − f̂_l(y))²_c

with learned non-negative weights w_l (1×1 convolutions without bias). It is symmetric, ≥ 0 and
0 for identical images. The five VGG stages need H, W ≥ 16; ``resize`` upsamples bilinearly first
(rfpp uses 224).

Weights come from a local safetensors file (nothing is downloaded), with the key names
- ``features.{i}.weight`` / ``features.{i}.bias`` for the 13 VGG16 convolutions,
  i ∈ {0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28} (torchvision's ``vgg16().features``);
- ``lin{l}.model.1.weight`` of shape (1, C_l, 1, 1), C = (64, 128, 256, 512, 512) (the LPIPS
  repo's ``vgg.pth`` v0.1 names);
``classifier.*`` keys (the rest of a torchvision VGG16 state dict) are ignored. So a file is the
union of torchvision's VGG16 state dict and LPIPS's ``vgg.pth``, re-saved with safetensors.

Losses (per sample, shape (B,)):
- :class:`LPIPSLoss`: LPIPS(x̂, x) between predicted and target images.
- :class:`LPIPSHuberLoss`, rfpp's "LPIPS-Huber" (Lee et al. 2024) in this repo's time convention
  (t = 0 noise, t = 1 data, X_t = t·X1 + (1 − t)·X0, v = X1 − X0)::

      x̂ = X_t + (1 − t)·v̂,   x = X_t + (1 − t)·v  (= X1 on the straight path)
      loss = t · H(v̂, v) + LPIPS(x̂, x),   H(a, b) = (√(‖a − b‖² + c²) − c) / d,  c = 0.00054·d

  (rfpp's scaling: c grows with d and the pseudo-Huber value of :func:`rf.losses.pseudo_huber` is
  divided by d, unlike :class:`rf.losses.PseudoHuber`'s c = 0.00054·√d of Song & Dhariwal).

  rfpp writes the Huber weight as (1 − t) with data at its t = 0; it is the same weight.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rf.losses import pseudo_huber
from rf.metrics.inception import load_checked, read_state_dict

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in features
CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for item in VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(item), kernel_size=3, padding=1), nn.ReLU()]
            cin = int(item)
    return nn.Sequential(*layers)


class _Linear(nn.Module):
    """``model.1`` is the 1×1 weighting conv (``model.0`` is LPIPS's dropout, off at eval)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS(x, y) per sample, shape (N,); a frozen network (no parameter needs a gradient)."""

    def __init__(self, resize: int | None = None):
        super().__init__()
        self.resize = resize
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.features = _vgg16_features()
        for index, channels in enumerate(CHANNELS):
            self.add_module(f"lin{index}", _Linear(channels))
        self.requires_grad_(False)
        self.eval()

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes (N, 3, H, W) or (N, 1, H, W) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS needs images of at least 16×16 (got {tuple(x.shape[-2:])}); set resize")
        x = (x - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                taps.append(x)
                if index == TAPS[-1]:
                    break
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS of images of different shapes: {tuple(x.shape)} vs {tuple(y.shape)}")
        dtype = self.shift.dtype
        total = x.new_zeros(x.shape[0], dtype=dtype)
        for index, (fx, fy) in enumerate(zip(self._activations(x.to(dtype)), self._activations(y.to(dtype)))):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{index}")((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return total


def load_lpips(weights_path: str | Path, resize: int | None = None) -> LPIPS:
    """:class:`LPIPS` with the backbone and linear weights of the safetensors file ``weights_path``
    (FileNotFoundError / ValueError naming the path when missing or not fitting; negative linear
    weights are refused since they would break LPIPS ≥ 0)."""
    model = LPIPS(resize=resize)
    load_checked(
        model, read_state_dict(weights_path), str(weights_path), ignore_prefixes=("classifier.", "shift", "scale")
    )
    negative = [f"lin{i}" for i in range(len(CHANNELS)) if (getattr(model, f"lin{i}").model[1].weight < 0).any()]
    if negative:
        raise ValueError(f"LPIPS weights in {weights_path} have negative linear weights in {', '.join(negative)}")
    return model


class LPIPSLoss(nn.Module):
    """Per-sample LPIPS(pred, target) between predicted and target images in [−1, 1]."""

    def __init__(self, lpips: LPIPS):
        super().__init__()
        self.lpips = lpips

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lpips(pred, target)


class LPIPSHuberLoss(nn.Module):
    """Per-sample t·H(v̂, v) + LPIPS(X_t + (1 − t)v̂, X_t + (1 − t)v) (see the module docstring);
    ``c=None`` picks rfpp's 0.00054·d."""

    def __init__(self, lpips: LPIPS, c: float | None = None):
        super().__init__()
        if c is not None and c <= 0:
            raise ValueError(f"pseudo-Huber c must be positive, got {c}")
        self.lpips = lpips
        self.c = c

    def forward(self, v_pred: torch.Tensor, v_target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = v_pred[0].numel()
        c = self.c if self.c is not None else 0.00054 * d
        huber = pseudo_huber(v_pred, v_target, c) / d
        remaining = (1.0 - t).reshape(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        perceptual = self.lpips(x_t + remaining * v_pred, x_t + remaining * v_target)
        return t.reshape(-1).to(huber.dtype) * huber + perceptual


def make_lpips_loss(weights_path: str | Path, variant: str = "lpips", resize: int | None = 224) -> nn.Module:
    """``lpips`` → :class:`LPIPSLoss`; ``lpips_huber`` → :class:`LPIPSHuberLoss` (rfpp); the LPIPS
    network loaded from ``weights_path``, images upsampled to ``resize`` (rfpp: 224; None keeps
    the size)."""
    if variant not in ("lpips", "lpips_huber"):
        raise ValueError(f"unknown LPIPS loss variant {variant!r}; choose 'lpips' or 'lpips_huber'")
    lpips = load_lpips(weights_path, resize=resize)
    return LPIPSLoss(lpips) if variant == "lpips" else LPIPSHuberLoss(lpips)
