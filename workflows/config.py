"""The pipeline file: one YAML that declares a whole run, validated completely before anything runs.

Loading is safe YAML (no object construction). ``--set a.b=value`` overrides are applied to the
parsed document before validation, the value parsed as a YAML scalar. Every problem is reported
at once, one line per field (``rounds: must be >= 1``), as a :class:`ConfigError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rf.models import build_model, input_shape
from workflows.distributions import DistributionSpec
from workflows.stages.couple import CouplingSettings
from workflows.stages.evaluate import EvalSettings
from workflows.stages.train import Choice, ModelSpec, TrainSettings, checked_time_sampler
from workflows.storage import StorageError, location

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """The pipeline file is invalid; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  {line}" for line in errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistillSettings(_Strict):
    """A k-step distillation: from the coupling of round ``from_round`` (warm-started from that
    round's flow), or from independent (random) pairs with ``pairs: independent``."""

    name: str | None = None
    from_round: int = Field(gt=0)
    pairs: Literal["coupling", "independent"] = "coupling"
    k: int = Field(1, gt=0)
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and not _NAME.match(name):
            raise ValueError(f"{name!r} is not a plain name (letters, digits, . _ -)")
        return name

    @property
    def stage_name(self) -> str:
        default = f"distill-{self.from_round}" + ("" if self.k == 1 else f"-k{self.k}")
        default += "-random" if self.pairs == "independent" else ""
        return self.name or default


class PipelineConfig(_Strict):
    """One run: data, model, rounds of reflow, distillation, evaluation, storage."""

    name: str
    storage: str = "./runs"
    seed: int = Field(0, ge=0)
    pi0: DistributionSpec
    pi1: DistributionSpec
    model: ModelSpec
    path: Literal["straight", "vp", "subvp"] = "straight"
    time_sampler: Choice = Choice(name="uniform")
    rounds: int = Field(2, ge=1, le=10)
    reflow: Literal["stored", "online"] = "stored"
    train: TrainSettings = TrainSettings()
    round_train: dict[int, dict[str, Any]] = Field(default_factory=dict)
    couple: CouplingSettings | None = None
    distill: list[DistillSettings] = Field(default_factory=list)
    baselines: list[Literal["vp", "subvp"]] = Field(default_factory=list)
    evaluate: EvalSettings = EvalSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name) or ".." in name:
            raise ValueError(f"{name!r} is not a plain name (letters, digits, . _ -; no '/' or '..')")
        return name

    _time_sampler = field_validator("time_sampler")(checked_time_sampler)

    @field_validator("storage")
    @classmethod
    def _storage(cls, uri: str) -> str:
        try:
            return location(uri).uri
        except StorageError as error:
            raise ValueError(str(error)) from None

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        problems = []
        model_shape = input_shape(build_model(self.model.kind, self.model.config))
        for field_name in ("pi0", "pi1"):
            shape = list(getattr(self, field_name).shape)
            if shape != model_shape:
                problems.append(f"{field_name} has shape {shape} but the model takes {model_shape}")
        for round_number in self.round_train:
            if not 1 <= round_number <= self.rounds:
                problems.append(f"round_train has round {round_number}, but rounds is {self.rounds}")
            else:
                problems += _settings_problems(f"round_train.{round_number}", self.round_settings, round_number)
        needs_pairs = (self.rounds > 1 and self.reflow == "stored") or any(d.pairs == "coupling" for d in self.distill)
        if needs_pairs and self.couple is None:
            problems.append("couple: missing (reflow rounds and distillation from couplings need pair settings)")
        for distill in self.distill:
            problems += _settings_problems(f"distill {distill.stage_name}: train", self.distill_settings, distill)
            if distill.from_round > self.rounds:
                problems.append(f"distill {distill.stage_name}: from_round {distill.from_round} > rounds {self.rounds}")
            if distill.pairs == "coupling" and self.reflow == "online":
                problems.append(f"distill {distill.stage_name} needs stored pairs, but reflow is online")
        stochastic = [name for name in self.evaluate.samplers if name.startswith("sde@")]
        if stochastic and self.pi0.kind != "noise":
            problems.append(f"evaluate.samplers: {stochastic} need pi0 to be Gaussian noise (kind noise)")
        if self.evaluate.classifier is not None and self.pi1.kind != "images":
            problems.append("evaluate.classifier: measures images, but pi1 is not of kind images")
        names = [d.stage_name for d in self.distill]
        if len(set(names)) != len(names):
            problems.append(f"distill stage names repeat: {names}; give them distinct names")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def round_settings(self, round_number: int) -> TrainSettings:
        """``train`` with this round's ``round_train`` overrides applied."""
        return TrainSettings(**{**self.train.model_dump(), **self.round_train.get(round_number, {})})

    def distill_settings(self, distill: DistillSettings) -> TrainSettings:
        """The training settings of a distillation: its round's, with its own ``train`` overrides."""
        return TrainSettings(**{**self.round_settings(distill.from_round).model_dump(), **distill.train})


def _settings_problems(where: str, build: Any, *args: Any) -> list[str]:
    """Problems of the training settings ``build(*args)`` makes, prefixed by ``where``."""
    try:
        build(*args)
    except ValidationError as error:
        return [f"{where}.{line}" for line in _format(error)]
    return []


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


def _format(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where or '(top level)'}: {message}")
    return lines


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
        raise ConfigError(source, _format(error)) from None


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
