"""The image stages of a pipeline: importing a dataset source, and the small classifier whose
feature space gives the digits' Fréchet distance.

- ``import-pi0`` / ``import-pi1``: :func:`workflows.images.import_images` of an
  :class:`~workflows.distributions.ImagesSpec` ``source`` into the stage's location (its
  ``_SUCCESS.json`` is the dataset manifest), so the pipeline works from a folder, zip, array or
  ``sklearn:digits`` without a separate import step.
- ``classifier``: a :class:`rf.models.digit_classifier.DigitClassifier` trained once on π1's
  images and labels, saved as safetensors; evaluation stages compute the Fréchet distance and
  precision/recall of samples in its feature space. It trains in a Ray task on one torch thread,
  so its weights — and every Fréchet distance measured with them — depend on the data and the
  settings alone, not on the machine's core count or on the stages running beside it in the
  driver (which share the driver's intra-op thread pool and change how reductions split).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field

from rf.models.digit_classifier import classifier_from_bytes, classifier_to_bytes, train_classifier
from workflows.distributions import ImagesSpec
from workflows.images import ImageDataset, import_images, to_unit_interval
from workflows.images.builtin import materialized
from workflows.stage import StageClock, code_version, finished_manifest, stage_hash, write_manifest
from workflows.storage import Location

logger = logging.getLogger("rectiflow.images")

CLASSIFIER_FILE = "classifier.safetensors"


def import_stage_hash(spec: ImagesSpec) -> str:
    """An import is decided by its source, resolution, channels and shard size."""
    return stage_hash("import", {"source": spec.source, "shape": spec.shape, "shard_size": spec.shard_size}, {})


def run_import_stage(spec: ImagesSpec, output: Location) -> dict[str, Any]:
    """Import ``spec.source`` into ``output`` (resumable: only missing shards are written)."""
    assert spec.source is not None
    with materialized(spec.source) as path:
        return import_images(
            path, output.uri, resolution=spec.shape[1], channels=spec.shape[0], shard_size=spec.shard_size,
            parallel=False, progress=logger.info,
        )


class ClassifierSettings(BaseModel):
    """``evaluate.classifier``: training of the feature classifier (digits-sized images)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(600, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)


def classifier_stage_hash(settings: ClassifierSettings, data: ImagesSpec) -> str:
    return stage_hash("classifier", settings.model_dump(mode="json"), {"data": str(data.identity())})


def _labelled_images(data: ImagesSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of π1's dataset (all classes) in [−1, 1], with its label."""
    dataset = ImageDataset.open(data.uri)
    images = to_unit_interval(torch.from_numpy(dataset.take(range(dataset.count))))
    return images, torch.from_numpy(dataset.labels())


@ray.remote(num_cpus=1)
def _train_on_one_thread(
    images: torch.Tensor, labels: torch.Tensor, settings: ClassifierSettings
) -> tuple[bytes, float, float]:
    """The classifier's safetensors bytes, its train accuracy and the CPU seconds it took."""
    torch.set_num_threads(1)
    started = time.process_time()
    model, train_accuracy = train_classifier(
        images, labels, steps=settings.steps, batch=settings.batch_size, seed=settings.seed, lr=settings.lr,
    )
    return classifier_to_bytes(model), train_accuracy, time.process_time() - started


def run_classifier_stage(settings: ClassifierSettings, data: ImagesSpec, output: Location) -> dict[str, Any]:
    """Train the classifier on π1's labelled images; the manifest records its train accuracy."""
    expected = {"settings": settings.model_dump(mode="json")}
    finished = finished_manifest(output, "classifier", "classifier", expected, ValueError)
    if finished is not None:
        return finished
    clock = StageClock()
    images, labels = _labelled_images(data)
    if (labels < 0).any():
        raise ValueError(f"{data.uri} has unlabelled images: the feature classifier needs class labels")
    data_bytes, train_accuracy, cpu_seconds = ray.get(_train_on_one_thread.remote(images, labels, settings))
    clock.add_worker(cpu_seconds)
    output.join(CLASSIFIER_FILE).write_bytes(data_bytes)
    manifest = {
        "kind": "classifier",
        "stage": output.name,
        "hash": classifier_stage_hash(settings, data),
        "settings": settings.model_dump(mode="json"),
        "data": data.uri,
        "images": len(images),
        "train_accuracy": train_accuracy,
        "classes": int(labels.max()) + 1,
        "sha256": hashlib.sha256(data_bytes).hexdigest(),
        "time": clock.summary(),
        "code": code_version(),
    }
    logger.info("classifier %s: train accuracy %.3f on %d images", output.uri, train_accuracy, len(images))
    write_manifest(output, manifest)
    return manifest


def load_classifier(stage: Location) -> tuple[torch.nn.Module, str]:
    """The classifier of a finished stage and its file's sha256 (for provenance)."""
    data = stage.join(CLASSIFIER_FILE).read_bytes()
    return classifier_from_bytes(data, stage.join(CLASSIFIER_FILE).uri), hashlib.sha256(data).hexdigest()

