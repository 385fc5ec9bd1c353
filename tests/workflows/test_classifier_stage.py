"""The feature-classifier stage: its weights (and so every classifier Fréchet distance) must not
depend on the driver's torch thread count, which changes how reductions split and which differs
between a laptop, a cluster head and a driver busy with other stages; its manifest names the
weights file and checksum that :func:`load_classifier` checks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from rf.models.digit_classifier import classifier_to_bytes, train_classifier
from workflows.images import import_images
from workflows.settings import ClassifierConfig, ImagesSpec
from workflows.stages.classifier import CLASSIFIER_FILE, ClassifierError, load_classifier, run
from workflows.storage import location


def _labelled_images(folder) -> tuple[np.ndarray, np.ndarray]:
    """256 16×16 grey images in 4 classes, each class a brighter shade of noise."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=256)
    images = np.clip(rng.normal(64 + 40 * labels[:, None, None], 30, size=(256, 16, 16)), 0, 255).astype(np.uint8)
    np.savez(folder / "labelled.npz", images=images, labels=labels)
    return images, labels


def _config(uri: str) -> ClassifierConfig:
    return ClassifierConfig(data=ImagesSpec(shape=[1, 16, 16], uri=uri, flip=False), steps=30, batch_size=64)


def test_the_classifier_does_not_depend_on_the_driver_thread_count(ray_session, tmp_path):
    images, labels = _labelled_images(tmp_path)
    import_images(str(tmp_path / "labelled.npz"), str(tmp_path / "data"), resolution=16, channels=1, parallel=False)
    config = _config(str(tmp_path / "data"))
    threads = torch.get_num_threads()
    try:
        # in-process training does depend on it (so the check below can fail)
        x = torch.from_numpy(images[:, None]).float() / 127.5 - 1.0
        trained = []
        for count in (1, 2):
            torch.set_num_threads(count)
            model, _ = train_classifier(x, torch.from_numpy(labels), steps=config.steps, batch=config.batch_size)
            trained.append(hashlib.sha256(classifier_to_bytes(model)).hexdigest())
        assert trained[0] != trained[1]

        manifests = []
        for count in (1, 2):
            torch.set_num_threads(count)
            output = location(str(tmp_path / f"classifier-{count}"))
            manifest = run(config, {}, output)
            assert manifest.kind == "classifier" and manifest.details["file"] == f"attempt-0/{CLASSIFIER_FILE}"
            weights = output.join(manifest.details["file"]).read_bytes()
            assert manifest.details["sha256"] == hashlib.sha256(weights).hexdigest()
            model, digest = load_classifier(output)
            assert digest == manifest.details["sha256"] and not model.training
            manifests.append(manifest)
    finally:
        torch.set_num_threads(threads)
    first, second = (manifest.details for manifest in manifests)
    assert first["sha256"] == second["sha256"] and manifests[0].hash == manifests[1].hash
    assert first["train_accuracy"] > 0.9 and (first["images"], first["classes"]) == (256, 4)
    assert manifests[0].time["cpu_seconds"] > 0

    weights = tmp_path / "classifier-1" / "attempt-0" / CLASSIFIER_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ClassifierError, match=f"{CLASSIFIER_FILE} has sha256 .*, the manifest says"):
        load_classifier(location(str(tmp_path / "classifier-1")))


def test_unlabelled_data_is_refused_naming_it(ray_session, tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((8, 16, 16), dtype=np.uint8))
    import_images(str(tmp_path / "plain.npy"), str(tmp_path / "data"), resolution=16, parallel=False)
    with pytest.raises(ClassifierError, match=r"data.uri .*data has unlabelled images"):
        run(_config(str(tmp_path / "data")), {}, location(str(tmp_path / "classifier")))
    assert not (tmp_path / "classifier" / "_SUCCESS.json").exists()
    with pytest.raises(ClassifierError, match="is a finished 'import' stage, not a classifier"):
        load_classifier(location(str(tmp_path / "data")))
