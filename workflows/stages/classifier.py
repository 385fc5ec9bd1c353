"""The ``classifier`` stage: the small classifier whose feature space gives the digits' Fréchet
distance and precision/recall.

``run(config: ClassifierConfig, inputs, output) → Manifest`` trains a
:class:`rf.models.digit_classifier.DigitClassifier` once on every labelled image of π1's imported
dataset (``config.data.uri``; a pipeline passes that import as an input, under any role) and
saves it as ``classifier.safetensors`` in the stage's attempt folder; the manifest's ``details``
name the file (relative to the output), its sha256, the images, the train accuracy and the number
of classes. Evaluation stages load it with :func:`load_classifier`.

The dataset is read and the classifier trained in one Ray task on one torch thread, so its
weights — and every Fréchet distance measured with them — depend on the data and the settings
alone, not on the machine's core count or on the stages running beside it in the driver (which
share the driver's intra-op thread pool and change how reductions split); and the driver holds no
image.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch

from rf.models.digit_classifier import classifier_from_bytes, classifier_to_bytes, train_classifier
from workflows.images import ImageDataset, to_unit_interval
from workflows.manifest import Manifest, read_manifest
from workflows.settings import ClassifierConfig, ClassifierSettings
from workflows.shard_format import ShardError, sha256
from workflows.stage import StageContext, run_stage
from workflows.storage import Location

KIND = "classifier"
CLASSIFIER_FILE = "classifier.safetensors"
logger = logging.getLogger("rectiflow.images")


class ClassifierError(ValueError):
    """The classifier stage cannot run on its data, or a classifier stage's output is unusable
    (names the field or file)."""


def _labelled_images(uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the dataset at ``uri`` (all classes) in [−1, 1], with its label;
    :class:`ClassifierError` when an image has none."""
    dataset = ImageDataset.open(uri)
    labels = torch.from_numpy(dataset.labels())
    if (labels < 0).any():
        raise ClassifierError(f"data.uri {uri} has unlabelled images: the feature classifier needs class labels")
    return to_unit_interval(torch.from_numpy(dataset.take(range(dataset.count)))), labels


@ray.remote(num_cpus=1)
def _train_on_one_thread(uri: str, settings: ClassifierSettings) -> dict[str, Any]:
    """The classifier's safetensors bytes, its train accuracy, the images and classes it saw and
    the CPU seconds it took."""
    torch.set_num_threads(1)
    started = time.process_time()
    images, labels = _labelled_images(uri)
    model, train_accuracy = train_classifier(
        images,
        labels,
        steps=settings.steps,
        batch=settings.batch_size,
        seed=settings.seed,
        lr=settings.lr,
    )
    return {
        "weights": classifier_to_bytes(model),
        "train_accuracy": train_accuracy,
        "images": len(images),
        "classes": int(labels.max()) + 1,
        "cpu_seconds": time.process_time() - started,
    }


def _train(config: ClassifierConfig, context: StageContext) -> dict[str, Any]:
    """Train in the Ray task, write the weights under the attempt folder; the manifest's details."""
    if config.data.uri is None:
        raise ClassifierError("data.uri: the classifier reads an imported dataset; import data.source first")
    try:
        trained = ray.get(_train_on_one_thread.remote(config.data.uri, config))
    except ray.exceptions.RayTaskError as error:  # the data's own problem, named by the task
        raise error.cause if isinstance(error.cause, (ClassifierError, ShardError)) else error from None
    context.clock.add_worker(trained["cpu_seconds"])
    target = context.attempt.join(CLASSIFIER_FILE)
    target.write_bytes(trained["weights"])
    logger.info(
        "classifier %s: train accuracy %.3f on %d images",
        context.output.uri,
        trained["train_accuracy"],
        trained["images"],
    )
    return {
        "file": context.relative(target),
        "sha256": sha256(trained["weights"]),
        "images": trained["images"],
        "train_accuracy": trained["train_accuracy"],
        "classes": trained["classes"],
    }


def run(config: ClassifierConfig, inputs: dict[str, Location], output: Location) -> Manifest:
    """Train (or find finished) the feature classifier of ``config`` into ``output``."""
    config = ClassifierConfig.model_validate(config)
    return run_stage(KIND, config, inputs, output, lambda context: _train(config, context), ClassifierError)


def load_classifier(stage: Location) -> tuple[torch.nn.Module, str]:
    """The classifier of a finished classifier stage and its file's sha256 (for provenance),
    checked against the manifest; :class:`ClassifierError` naming the file otherwise."""
    manifest = read_manifest(stage)
    if manifest.kind != KIND:
        raise ClassifierError(f"{stage.uri} is a finished {manifest.kind!r} stage, not a classifier")
    try:
        target, expected = stage.join(manifest.details["file"]), manifest.details["sha256"]
    except (KeyError, TypeError) as error:
        raise ClassifierError(f"{stage.uri}/_SUCCESS.json does not name the classifier's file ({error!r})") from None
    data = target.read_bytes()
    digest = sha256(data)
    if digest != expected:
        raise ClassifierError(
            f"{target.uri} has sha256 {digest}, the manifest says {expected}: it changed after the stage finished"
        )
    return classifier_from_bytes(data, target.uri), digest
