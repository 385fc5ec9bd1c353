"""Weights on disk as safetensors plus a JSON architecture spec; loading never unpickles.

A saved model is two files: ``model.safetensors`` (the state dict) and ``model.json``
(``{"kind", "config"}`` from :func:`rf.models.model_spec`). The byte-level functions let callers
that hold files elsewhere (object storage) use the same format without a local copy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save
from torch import nn

from rf.models import build_model, model_spec

if TYPE_CHECKING:
    from rf.training import VelocityTrainer

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or not in the safe format."""


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise named tensors (made contiguous, on the CPU) as safetensors bytes."""
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return _safetensors_save(cpu, metadata=metadata)


def tensors_from_bytes(data: bytes, source: str = "<bytes>") -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything else (a pickle, a truncated file) is refused."""
    try:
        return _safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{source} is not a valid safetensors file and will not be unpickled: {error}") from None


def model_to_files(model: nn.Module) -> dict[str, bytes]:
    """``{WEIGHTS_FILE: safetensors bytes, SPEC_FILE: JSON bytes}`` for ``model``."""
    spec = json.dumps(model_spec(model), sort_keys=True).encode()
    return {WEIGHTS_FILE: tensors_to_bytes(model.state_dict()), SPEC_FILE: spec}


def model_from_files(weights: bytes, spec: bytes, source: str = "<checkpoint>") -> nn.Module:
    """Rebuild a model from its spec and load its weights strictly (every key must match)."""
    try:
        parsed = json.loads(spec)
        kind, config = parsed["kind"], parsed["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{source}/{SPEC_FILE} is not a model spec: {error}") from None
    model = build_model(kind, config)
    state = tensors_from_bytes(weights, f"{source}/{WEIGHTS_FILE}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source}: weights do not match the {kind} spec: {error}") from None
    return model


def save_model(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in model_to_files(model).items():
        (directory / name).write_bytes(data)
    return directory


def load_model(directory: str | Path) -> nn.Module:
    """Load a model saved by :func:`save_model` (weights only; no code is executed)."""
    directory = Path(directory)
    try:
        weights = (directory / WEIGHTS_FILE).read_bytes()
        spec = (directory / SPEC_FILE).read_bytes()
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {error.filename} is missing") from None
    return model_from_files(weights, spec, str(directory))


EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"


def _optimizer_to_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    """Optimizer state as safetensors: tensors named ``{param_index}.{key}``; the param groups and
    any non-tensor per-parameter values go into the JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors_to_bytes(tensors, metadata)


def metadata_from_bytes(data: bytes, source: str = "<bytes>") -> dict[str, str]:
    """The ``__metadata__`` string map of safetensors bytes (the format's JSON header, after its
    8-byte little-endian length)."""
    try:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        return dict(header.get("__metadata__") or {})
    except (ValueError, AttributeError) as error:
        raise CheckpointError(f"{source} has no readable safetensors header: {error}") from None


def _optimizer_from_bytes(data: bytes, source: str) -> dict:
    tensors = tensors_from_bytes(data, source)
    metadata = metadata_from_bytes(data, source)
    try:
        groups = json.loads(metadata["param_groups"])
        scalars = json.loads(metadata["scalars"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{source} lacks optimizer metadata: {error}") from None
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *scalars.items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}


def trainer_to_files(trainer: VelocityTrainer) -> dict[str, bytes]:
    """Everything needed to resume a :class:`rf.training.VelocityTrainer` bit-for-bit: model
    (weights + spec), EMA weights, optimizer state and the step count."""
    files = model_to_files(trainer.model)
    files[EMA_FILE] = tensors_to_bytes(trainer.ema.state_dict())
    files[OPTIMIZER_FILE] = _optimizer_to_bytes(trainer.optimizer)
    files[TRAINER_FILE] = json.dumps({"step": trainer.step_count}).encode()
    return files


def restore_trainer(trainer: VelocityTrainer, files: Mapping[str, bytes], source: str) -> None:
    """Load :func:`trainer_to_files` output into ``trainer`` (whose model has the same spec)."""
    missing = [name for name in (WEIGHTS_FILE, EMA_FILE, OPTIMIZER_FILE, TRAINER_FILE) if name not in files]
    if missing:
        raise CheckpointError(f"checkpoint {source} is incomplete: missing {', '.join(missing)}")
    try:
        trainer.model.load_state_dict(tensors_from_bytes(files[WEIGHTS_FILE], f"{source}/{WEIGHTS_FILE}"))
        trainer.ema.load_state_dict(tensors_from_bytes(files[EMA_FILE], f"{source}/{EMA_FILE}"))
        trainer.optimizer.load_state_dict(_optimizer_from_bytes(files[OPTIMIZER_FILE], f"{source}/{OPTIMIZER_FILE}"))
        trainer.step_count = int(json.loads(files[TRAINER_FILE])["step"])
    except (RuntimeError, KeyError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {source} does not fit this model: {error}") from None
