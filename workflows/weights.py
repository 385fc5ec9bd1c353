"""A stage's model on storage: ``{stage}/model/model.safetensors`` + ``model.json``.

Training stages write their final EMA weights here; coupling and evaluation stages load them.
Loading reads the manifest first, so an unfinished stage is never used, and never unpickles.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rf.checkpoint import SPEC_FILE, WEIGHTS_FILE, CheckpointError, model_from_files, model_to_files
from rf.models import input_shape
from workflows.stage import StageNotFinished, read_manifest
from workflows.storage import Location

MODEL_DIR = "model"


def write_model(output: Location, model: nn.Module) -> Location:
    """Write ``model`` under ``output/model`` (each file atomically); returns that folder."""
    folder = output.join(MODEL_DIR)
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


def load_stage_model(stage: Location) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, manifest) of a finished training stage."""
    manifest = read_manifest(stage)
    model = read_model(stage.join(manifest.get("model", MODEL_DIR)))
    return model.eval(), manifest


def load_input_model(
    stage: Location, role: str, shape: list[int], error: type[Exception]
) -> tuple[nn.Module, str]:
    """(model in eval mode, its stage hash) of the finished training stage ``stage`` that another
    stage uses as its ``role`` (teacher, model), checked to take examples of ``shape`` (π0's);
    ``error`` naming ``role`` and ``stage`` when it is unfinished, unloadable or has no hash."""
    try:
        model, manifest = load_stage_model(stage)
    except (StageNotFinished, CheckpointError, OSError, ValueError) as problem:
        raise error(f"{role} {stage.uri} cannot be loaded: {problem}") from None
    stage_hash = manifest.get("hash")
    if not isinstance(stage_hash, str) or not stage_hash:
        raise error(f"{role} {stage.uri}: its _SUCCESS.json has no 'hash'")
    if input_shape(model) != list(shape):
        raise error(
            f"{role} {stage.uri} takes inputs of shape {input_shape(model)}, "
            f"but pi0 draws samples of shape {list(shape)}"
        )
    return model, stage_hash
