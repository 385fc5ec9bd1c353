"""A small CNN classifier of small grey images, whose penultimate layer defines a "digit FID".

Architecture (input (N, C, H, W) in [−1, 1], any H, W ≥ 4)::

    conv3×3(C→w) → ReLU → maxpool2 → conv3×3(w→2w) → ReLU → maxpool2
    → adaptive average pool to 4×4 → flatten → linear(32w → feature_dim) → ReLU   = features(x)
    → linear(feature_dim → num_classes)                                            = logits

Digit FID = Fréchet distance between Gaussians fitted to ``features`` of two image sets.
:func:`train_classifier` trains with Adam on cross-entropy, deterministically for a seed on the CPU.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from rf.checkpoint import CheckpointError, metadata_from_bytes, tensors_from_bytes, tensors_to_bytes
from rf.metrics.distribution import frechet_distance_of_features


class DigitClassifier(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.in_channels, self.num_classes, self.width, self.feature_dim = in_channels, num_classes, width, feature_dim
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict[str, int]:
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, feature_dim) penultimate activations."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)
        return F.relu(self.fc1(h))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The class logits of penultimate ``features``."""
        return self.fc2(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 300,
    batch: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    **config: int,
) -> tuple[DigitClassifier, float]:
    """Train a :class:`DigitClassifier` (``config`` overrides its constructor; ``in_channels`` and
    ``num_classes`` default to the data's) for ``steps`` Adam steps on minibatches of ``batch``
    drawn with replacement. Returns (model in eval mode, accuracy on the training set).
    Deterministic for a seed on the CPU; the global RNG is left untouched."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images, got {len(images)} images and {len(labels)} labels")
    images, labels = images.float().cpu(), labels.long().cpu()
    config = {"in_channels": images.shape[1], "num_classes": int(labels.max()) + 1, **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(**config)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(images), (min(batch, len(images)),), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model, accuracy(model, images, labels)


@torch.no_grad()
def _batched(model: DigitClassifier, fn, images: torch.Tensor, batch: int) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([fn(chunk.to(device, torch.float32)).cpu() for chunk in images.split(batch)])


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> float:
    """Share of ``images`` whose arg-max logit is the label."""
    predictions = _batched(model, model, images, batch).argmax(1)
    return float((predictions == labels.cpu()).float().mean())


def digit_fid(model: DigitClassifier, images_a: torch.Tensor, images_b: torch.Tensor, batch: int = 512) -> float:
    """Fréchet distance between Gaussians fitted to ``model.features`` of the two image sets."""
    return frechet_distance_of_features(
        _batched(model, model.features, images_a, batch), _batched(model, model.features, images_b, batch)
    )


def classifier_to_bytes(model: DigitClassifier) -> bytes:
    """safetensors bytes of the weights, with the constructor config in the metadata."""
    return tensors_to_bytes(model.state_dict(), {"config": json.dumps(model.config())})


def classifier_from_bytes(data: bytes, source: str = "<bytes>") -> DigitClassifier:
    """Inverse of :func:`classifier_to_bytes` (never unpickles); an eval-mode model."""
    try:
        model = DigitClassifier(**json.loads(metadata_from_bytes(data, source)["config"]))
        model.load_state_dict(tensors_from_bytes(data, source))
    except (KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{source} is not a digit classifier: {error}") from None
    return model.eval()
