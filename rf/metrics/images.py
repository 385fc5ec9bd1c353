"""Sample-quality scores of images from Inception features and logits.

- FID = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_aΣ_b)^½) of Gaussians fitted to pool3 features.
- Inception Score = exp(E_x KL(p(y|x) ‖ p(y))), p(y|x) = softmax(logits), p(y) the mean of
  p(y|x) over a split; reported as mean and std over ``splits`` disjoint splits.
- KID = unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³,
      MMD² = Σ_{i≠j} k(a_i, a_j)/(m(m−1)) + Σ_{i≠j} k(b_i, b_j)/(m(m−1)) − 2 Σ_{i,j} k(a_i, b_j)/m²,
  averaged over ``subsets`` random subsets of ``subset_size`` points of each set (drawn without
  replacement); reported as mean and std. Unbiased: it can be slightly negative.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from rf.metrics.distribution import _features, frechet_distance_of_features


def fid(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on pool3 features)."""
    return frechet_distance_of_features(features_a, features_b)


def inception_score(logits: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` splits of exp(E_x KL(p(y|x) ‖ p(y)))."""
    z = _features(logits)
    if not 1 <= splits <= len(z):
        raise ValueError(f"inception score needs 1 <= splits <= number of samples, got {splits} for {len(z)}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, splits):
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0) + 1e-300)
        kl = (p * (part - log_marginal[None, :])).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(
    features_a: torch.Tensor | np.ndarray,
    features_b: torch.Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) over ``subsets`` of the unbiased polynomial-kernel MMD²; ``subset_size`` is
    capped at the size of the smaller set."""
    a, b = _features(features_a), _features(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets of different dimensions: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 and at least two points per subset, got {subsets} × {m}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
        off = m * (m - 1)
        values.append((k_xx.sum() - np.trace(k_xx)) / off + (k_yy.sum() - np.trace(k_yy)) / off - 2.0 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


def extract_features(
    model: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    batch: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (images → (features, logits), e.g. :class:`rf.metrics.inception.InceptionV3`)
    over ``images`` — one (N, C, H, W) tensor cut into batches of ``batch``, or an iterable of
    batches — in eval mode under ``torch.inference_mode``; returns float32 CPU tensors."""
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    chunks = images.split(batch) if isinstance(images, torch.Tensor) else images
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features, logits = [], []
    try:
        with torch.inference_mode():
            for chunk in chunks:
                f, z = model(chunk.to(device, torch.float32))
                features.append(f.float().cpu())
                logits.append(z.float().cpu())
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("extract_features got no images")
    return torch.cat(features), torch.cat(logits)
