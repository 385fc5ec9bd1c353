"""The feature-classifier stage: its weights (and so every classifier Fréchet distance) must not
depend on the driver's torch thread count, which changes how reductions split and which differs
between a laptop, a cluster head and a driver busy with other stages."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from rf.models.digit_classifier import classifier_to_bytes, train_classifier
from workflows.distributions import ImagesSpec
from workflows.images import import_images
from workflows.stages.images import CLASSIFIER_FILE, ClassifierSettings, run_classifier_stage
from workflows.storage import location

SETTINGS = ClassifierSettings(steps=30, batch_size=64)


def _labelled_images(folder) -> tuple[np.ndarray, np.ndarray]:
    """256 16×16 grey images in 4 classes, each class a brighter shade of noise."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=256)
    images = np.clip(rng.normal(64 + 40 * labels[:, None, None], 30, size=(256, 16, 16)), 0, 255).astype(np.uint8)
    np.savez(folder / "labelled.npz", images=images, labels=labels)
    return images, labels


def _sha256(output) -> str:
    return hashlib.sha256(output.join(CLASSIFIER_FILE).read_bytes()).hexdigest()


def test_the_classifier_does_not_depend_on_the_driver_thread_count(ray_session, tmp_path):
    images, labels = _labelled_images(tmp_path)
    import_images(str(tmp_path / "labelled.npz"), str(tmp_path / "data"), resolution=16, channels=1, progress=None)
    data = ImagesSpec(shape=[1, 16, 16], uri=str(tmp_path / "data"), flip=False)
    threads = torch.get_num_threads()
    try:
        # in-process training does depend on it (so the check below can fail)
        x = torch.from_numpy(images[:, None]).float() / 127.5 - 1.0
        trained = []
        for count in (1, 2):
            torch.set_num_threads(count)
            model, _ = train_classifier(x, torch.from_numpy(labels), steps=SETTINGS.steps, batch=SETTINGS.batch_size)
            trained.append(hashlib.sha256(classifier_to_bytes(model)).hexdigest())
        assert trained[0] != trained[1]

        manifests = []
        for count in (1, 2):
            torch.set_num_threads(count)
            output = location(str(tmp_path / f"classifier-{count}"))
            manifests.append(run_classifier_stage(SETTINGS, data, output))
            assert manifests[-1]["sha256"] == _sha256(output)
    finally:
        torch.set_num_threads(threads)
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    assert manifests[0]["train_accuracy"] > 0.9 and manifests[0]["time"]["cpu_seconds"] > 0
