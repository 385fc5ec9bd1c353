"""The training loss of a config, with LPIPS weights read through the storage layer."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rf.losses import make_loss
from workflows.settings import LossChoice
from workflows.stage import StageInputError
from workflows.storage import StorageError, location


def build_loss(choice: LossChoice) -> Any:
    """The loss of ``choice``; LPIPS weights are read from their URI (StageInputError naming
    ``loss.weights`` when missing or unusable). Nothing is downloaded."""
    if not choice.is_lpips:
        return make_loss(choice.name, **choice.options)
    weights = location(choice.weights)
    try:
        data = weights.read_bytes()
    except (FileNotFoundError, StorageError, OSError) as error:
        raise StageInputError(f"loss.weights: cannot read the LPIPS weights at {weights.uri}: {error}") from None
    suffix = Path(weights.path).suffix or ".safetensors"
    with tempfile.TemporaryDirectory() as directory:
        local = Path(directory, f"lpips{suffix}")
        local.write_bytes(data)
        try:
            return make_loss(choice.name, weights=local, **choice.options)
        except (ValueError, FileNotFoundError) as error:
            message = str(error).replace(str(local), weights.uri)
            raise StageInputError(f"loss.weights: {message}") from None
