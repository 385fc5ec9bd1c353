"""The whole pipeline file: data, model, rounds of reflow, distillation, evaluation, storage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from workflows.settings.base import Strict, format_errors, plain_name
from workflows.settings.data import DistributionSpec
from workflows.settings.sampling import CouplingSettings, EvalSettings
from workflows.settings.training import Choice, ModelSpec, PathName, TrainSettings
from workflows.storage import StorageError, location

Baseline = Literal["vp", "subvp", "vp_const"]
BASELINE_LABELS = {"vp": "VP ODE", "subvp": "sub-VP ODE", "vp_const": "VP ODE (constant speed)"}


class DistillSettings(Strict):
    """A k-step distillation of a flow: reflow round ``from_round``'s or a baseline's
    (``from_baseline``: vp, subvp, vp_const), warm-started from that flow, learning its coupling
    (``pairs: coupling``) or independent random pairs (``pairs: independent``)."""

    name: str | None = None
    from_round: int | None = Field(None, gt=0)
    from_baseline: Baseline | None = None
    pairs: Literal["coupling", "independent"] = "coupling"
    k: int = Field(1, gt=0)
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        return None if name is None else plain_name(name)

    @model_validator(mode="after")
    def _one_teacher(self) -> DistillSettings:
        if (self.from_round is None) == (self.from_baseline is None):
            raise ValueError("give exactly one of from_round (a reflow round) or from_baseline (vp, subvp, vp_const)")
        return self

    @property
    def teacher(self) -> str:
        """Stage name of the flow it distils: ``train-{round}`` or ``train-{baseline}``."""
        return f"train-{self.from_round if self.from_round is not None else self.from_baseline}"

    @property
    def teacher_label(self) -> str:
        return f"{self.from_round}-RF" if self.from_round is not None else BASELINE_LABELS[self.from_baseline]

    @property
    def stage_name(self) -> str:
        default = f"distill-{self.from_round if self.from_round is not None else self.from_baseline}"
        default += ("" if self.k == 1 else f"-k{self.k}") + ("-random" if self.pairs == "independent" else "")
        return self.name or default


class PipelineConfig(Strict):
    """One run: data, model, rounds of reflow, distillation, evaluation, storage."""

    name: str
    storage: str = "./runs"
    seed: int = Field(0, ge=0)
    pi0: DistributionSpec
    pi1: DistributionSpec
    model: ModelSpec
    path: PathName = "straight"
    time_sampler: Choice = Choice(name="uniform")
    rounds: int = Field(2, ge=1, le=10)
    reflow: Literal["stored", "online"] = "stored"
    train: TrainSettings = TrainSettings()
    round_train: dict[int, dict[str, Any]] = Field(default_factory=dict)
    couple: CouplingSettings | None = None
    distill: list[DistillSettings] = Field(default_factory=list)
    baselines: list[Baseline] = Field(default_factory=list)
    evaluate: EvalSettings = EvalSettings()

    _name = field_validator("name")(plain_name)

    @field_validator("storage")
    @classmethod
    def _storage(cls, uri: str) -> str:
        try:
            return location(uri).uri
        except StorageError as error:
            raise ValueError(str(error)) from None

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        problems = []
        model_shape = self.model.input_shape
        for field_name in ("pi0", "pi1"):
            shape = list(getattr(self, field_name).shape)
            if shape != model_shape:
                problems.append(f"{field_name} has shape {shape} but the model takes {model_shape}")
        for round_number in self.round_train:
            if not 1 <= round_number <= self.rounds:
                problems.append(f"round_train has round {round_number}, but rounds is {self.rounds}")
            else:
                problems += _settings_problems(f"round_train.{round_number}", self.round_settings, round_number)
        stored_distills = [d for d in self.distill if d.pairs == "coupling"]
        if ((self.rounds > 1 and self.reflow == "stored") or stored_distills) and self.couple is None:
            problems.append("couple: missing (reflow rounds and distillation from couplings need pair settings)")
        for distill in self.distill:
            problems += _settings_problems(f"distill {distill.stage_name}: train", self.distill_settings, distill)
            if distill.from_round is not None and distill.from_round > self.rounds:
                problems.append(f"distill {distill.stage_name}: from_round {distill.from_round} > rounds {self.rounds}")
            if distill.from_baseline is not None and distill.from_baseline not in self.baselines:
                problems.append(
                    f"distill {distill.stage_name}: from_baseline {distill.from_baseline} is not in baselines "
                    f"{self.baselines}"
                )
            if distill.pairs == "coupling" and distill.from_round is not None and self.reflow == "online":
                problems.append(f"distill {distill.stage_name} needs stored pairs, but reflow is online")
        stochastic = [name for name in self.evaluate.samplers if name.startswith("sde@")]
        if stochastic and self.pi0.kind != "noise":
            problems.append(f"evaluate.samplers: {stochastic} need pi0 to be Gaussian noise (kind noise)")
        if self.evaluate.classifier is not None and self.pi1.kind != "images":
            problems.append("evaluate.classifier: measures images, but pi1 is not of kind images")
        names = [d.stage_name for d in self.distill]
        if len(set(names)) != len(names):
            problems.append(f"distill stage names repeat: {names}; give them distinct names")
        if len(set(self.baselines)) != len(self.baselines):
            problems.append(f"baselines repeat: {self.baselines}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def round_settings(self, round_number: int) -> TrainSettings:
        """``train`` with this round's ``round_train`` overrides applied."""
        return TrainSettings(**{**self.train.model_dump(), **self.round_train.get(round_number, {})})

    def distill_settings(self, distill: DistillSettings) -> TrainSettings:
        """The training settings of a distillation: its teacher round's (round 1's for a baseline),
        with its own ``train`` overrides."""
        return TrainSettings(**{**self.round_settings(distill.from_round or 1).model_dump(), **distill.train})


def _settings_problems(where: str, build: Callable[..., Any], *args: Any) -> list[str]:
    """Problems of the training settings ``build(*args)`` makes, prefixed by ``where``."""
    try:
        build(*args)
    except ValidationError as error:
        return [f"{where}.{line}" for line in format_errors(error)]
    return []
