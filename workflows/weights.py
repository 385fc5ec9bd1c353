"""A stage's model on storage: ``model.safetensors`` + ``model.json`` in the folder that the
training stage's manifest names (``details.model``, inside its attempt folder).

Training stages write their final EMA weights there; coupling and evaluation stages load them.
Loading reads the manifest first, so an unfinished stage is never used, and never unpickles.
"""

from __future__ import annotations

from torch import nn

from rf.checkpoint import SPEC_FILE, WEIGHTS_FILE, CheckpointError, model_from_files, model_to_files
from rf.models import input_shape
from workflows.manifest import Manifest, StageNotFinished, read_manifest
from workflows.storage import Location


def write_model(folder: Location, model: nn.Module) -> Location:
    """Write ``model`` into ``folder`` (each file atomically); returns the folder."""
    for name, data in model_to_files(model).items():
        folder.join(name).write_bytes(data)
    return folder


def read_model(folder: Location) -> nn.Module:
    """The model saved by :func:`write_model` in ``folder``."""
    try:
        weights = folder.join(WEIGHTS_FILE).read_bytes()
        spec = folder.join(SPEC_FILE).read_bytes()
    except FileNotFoundError as error:
        raise CheckpointError(f"model at {folder.uri} is incomplete: {error}") from None
    return model_from_files(weights, spec, folder.uri)


def model_folder(stage: Location, manifest: Manifest) -> Location:
    """Where a finished training stage keeps its model."""
    relative = manifest.details.get("model")
    if manifest.kind != "train" or not isinstance(relative, str):
        raise CheckpointError(f"{stage.uri} is a {manifest.kind} stage without a model, not a training stage")
    return stage.join(relative)


def load_stage_model(stage: Location) -> tuple[nn.Module, Manifest]:
    """(model in eval mode, manifest) of a finished training stage."""
    manifest = read_manifest(stage)
    return read_model(model_folder(stage, manifest)).eval(), manifest


def load_input_model(stage: Location, role: str, shape: list[int], error: type[Exception]) -> tuple[nn.Module, str]:
    """(model in eval mode, its stage hash) of the finished training stage ``stage`` that another
    stage uses as its ``role`` (teacher, model), checked to take examples of ``shape`` (π0's);
    ``error`` naming ``role`` and ``stage`` when it is unfinished, unloadable or has no hash."""
    try:
        model, manifest = load_stage_model(stage)
    except (StageNotFinished, CheckpointError, OSError, ValueError) as problem:
        raise error(f"{role} {stage.uri} cannot be loaded: {problem}") from None
    stage_hash = manifest.hash
    if input_shape(model) != list(shape):
        raise error(
            f"{role} {stage.uri} takes inputs of shape {input_shape(model)}, "
            f"but pi0 draws samples of shape {list(shape)}"
        )
    return model, stage_hash
