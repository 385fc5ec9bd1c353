"""A stage's model on storage: ``{stage}/model/model.safetensors`` + ``model.json``.

Training stages write their final EMA weights here; coupling and evaluation stages load them.
Loading reads the manifest first, so an unfinished stage is never used, and never unpickles.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rf.checkpoint import SPEC_FILE, WEIGHTS_FILE, CheckpointError, model_from_files, model_to_files
from workflows.stage import read_manifest
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
