"""Reading a pipeline file: one YAML that declares a whole run, validated completely (against
:mod:`workflows.settings`) before anything runs.

Loading is safe YAML (no object construction). ``--set a.b=value`` overrides are applied to the
parsed document before validation, the value parsed as a YAML scalar. Every problem is reported
at once, one line per field (``rounds: must be >= 1``), as a :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from workflows.settings import PipelineConfig, format_errors


class ConfigError(ValueError):
    """The pipeline file is invalid; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  {line}" for line in errors))


def _set(document: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to the parsed document (creating mappings on the way)."""
    if "=" not in assignment:
        raise ConfigError("--set", [f"{assignment!r} is not of the form key=value"])
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError("--set", [f"{key!r} is not a dotted key like train.steps"])
    target: Any = document
    for part in parts[:-1]:
        if isinstance(target, list):
            target = _list_item(target, part, key)
            continue
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError("--set", [f"{key}: {part} is not a mapping or a list"])
        target = child
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError("--set", [f"{key}: {error}"]) from None
    if isinstance(target, list):
        _list_item(target, parts[-1], key)
        target[int(parts[-1])] = value
    else:
        target[parts[-1]] = value


def _list_item(items: list[Any], index: str, key: str) -> Any:
    if not index.isdigit() or int(index) >= len(items):
        raise ConfigError("--set", [f"{key}: {index} is not an index of a list of {len(items)}"])
    return items[int(index)]


def parse_pipeline(document: Any, overrides: list[str] = (), source: str = "pipeline") -> PipelineConfig:
    """Validate a parsed pipeline document (with ``key=value`` overrides applied)."""
    if not isinstance(document, dict):
        raise ConfigError(source, ["(top level): the pipeline file must be a mapping of keys to values"])
    document = yaml.safe_load(yaml.safe_dump(document))  # a deep copy of plain data
    for assignment in overrides:
        _set(document, assignment)
    try:
        return PipelineConfig.model_validate(document)
    except ValidationError as error:
        raise ConfigError(source, format_errors(error)) from None


def load_pipeline(path: str | Path, overrides: list[str] = (), storage: str | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(str(path), [f"cannot read the file: {error.strerror}"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(str(path), [f"not valid YAML: {error}"]) from None
    extra = [f"storage={storage}"] if storage else []
    return parse_pipeline(document, [*overrides, *extra], str(path))


MICRO_BATCH_FLOOR = 16
"""Examples per GPU per forward pass below which the gradient all-reduce outweighs the compute."""


def config_warnings(config: PipelineConfig) -> list[str]:
    """What is valid but probably not meant: GPU training with micro-batches below
    :data:`MICRO_BATCH_FLOOR` (one line per training setting that does it)."""
    settings = {
        f"round_train.{k}" if k in config.round_train else "train": config.round_settings(k)
        for k in range(1, config.rounds + 1)
    }
    settings |= {f"distill {d.stage_name}: train": config.distill_settings(d) for d in config.distill}
    return [
        f"{where}: a micro-batch of {train.micro_batch} per GPU (batch_size {train.batch_size} / ({train.workers} "
        f"workers × grad_accumulation {train.grad_accumulation})) is below {MICRO_BATCH_FLOOR}: the all-reduce "
        "outweighs the compute; use fewer workers or a larger batch_size (grad_accumulation only lowers it)"
        for where, train in settings.items()
        if train.gpus_per_worker > 0 and train.micro_batch < MICRO_BATCH_FLOOR
    ]
