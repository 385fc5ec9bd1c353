import pytest
import torch

from rf.checkpoint import CheckpointError
from rf.models.digit_classifier import (
    DigitClassifier,
    classifier_from_bytes,
    classifier_to_bytes,
    digit_fid,
    train_classifier,
)


def _patterns(n_per_class=100, size=16, seed=0):
    """Three classes of 1×size×size images in [−1, 1]: a horizontal bar, a vertical bar, a
    diagonal, each at a random offset, plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for label in range(3):
        for _ in range(n_per_class):
            image = -torch.ones(size, size)
            offset = int(torch.randint(2, size - 2, (1,), generator=generator))
            if label == 0:
                image[offset - 1 : offset + 1, :] = 1.0
            elif label == 1:
                image[:, offset - 1 : offset + 1] = 1.0
            else:
                index = torch.arange(size)
                image[index, (index + offset) % size] = 1.0
            images.append(image + 0.3 * torch.randn(size, size, generator=generator))
            labels.append(label)
    return torch.stack(images).unsqueeze(1).clamp(-1, 1), torch.tensor(labels)


def test_classifier_learns_synthetic_classes_in_60_steps_and_deterministically():
    images, labels = _patterns()
    model, accuracy = train_classifier(images, labels, steps=60, batch=32, seed=3, lr=3e-3, width=8)
    assert accuracy >= 0.95
    again, accuracy_again = train_classifier(images, labels, steps=60, batch=32, seed=3, lr=3e-3, width=8)
    assert accuracy_again == accuracy
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert model.features(images[:5]).shape == (5, 64)
        assert model(images[:5]).shape == (5, 3)


def test_digit_fid_separates_distributions_and_round_trips():
    images, labels = _patterns(n_per_class=60)
    model, _ = train_classifier(images, labels, steps=40, batch=32, seed=0, lr=3e-3, width=8)
    held_out, held_labels = _patterns(n_per_class=60, seed=1)
    same = digit_fid(model, images, held_out)
    only_bars = digit_fid(model, images, held_out[held_labels == 0])
    assert 0 <= same < only_bars
    restored = classifier_from_bytes(classifier_to_bytes(model))
    assert restored.config() == model.config()
    assert digit_fid(restored, images, held_out) == pytest.approx(same)
    with pytest.raises(CheckpointError):
        classifier_from_bytes(b"not safetensors")


def test_features_of_a_32x32_classifier():
    model = DigitClassifier(in_channels=1, num_classes=10, feature_dim=64)
    assert model.features(torch.zeros(2, 1, 32, 32)).shape == (2, 64)
