"""What the stages that sample a trained flow decide: couplings (``couple:``), evaluations
(``evaluate:``), and the image stages around them (an import, the feature classifier)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rf.options.solvers import SolverSpec
from workflows.settings.base import Strict, neutral
from workflows.settings.data import DistributionSpec, ImagesSpec
from workflows.settings.training import PathName

DEFAULT_SHARD_SIZE = 10_000
StoredDtype = Literal["float32", "float16", "uint8"]
Precision = Literal["fp32", "bf16"]


def canonical_solver(text: str) -> str:
    return SolverSpec.parse(text).name


class CouplingSettings(Strict):
    """How pairs are made: how many, in which shards, by which solver, stored how, on what.

    ``shard_size`` defaults to 10 000, or ``pairs`` when there are fewer. ``dtype`` uint8 is for
    x1 of images in [−1, 1] and needs ``store_x0=False`` (x0 is then regenerated from the seed on
    read). ``forward_batch`` is the fixed row count of every network call, ``precision`` (bf16:
    the network under bf16 autocast, states in fp32) and ``compile`` (torch.compile of the network)
    change the bits too; ``batch_size`` (ids solved together) and the resources only decide how
    fast pairs are made."""

    pairs: int = Field(gt=0)
    shard_size: int = Field(ge=1)
    solver: str = "rk45@1e-5"
    dtype: StoredDtype = "float32"
    store_x0: bool = True
    batch_size: int = neutral(256, ge=1)
    forward_batch: int | None = Field(None, ge=1)
    """Rows of every network call (fixed, zero-padded: it decides the bits); None: the largest
    batch whose activations fit ``memory_budget_mb``, at most 256."""
    memory_budget_mb: int = Field(2048, gt=0)
    precision: Precision = "fp32"
    compile: bool = False
    workers: int = neutral(1, ge=1)
    cpus_per_worker: float = neutral(1.0, gt=0)
    gpus_per_worker: float = neutral(0.0, ge=0)

    _solver = field_validator("solver")(canonical_solver)

    @model_validator(mode="before")
    @classmethod
    def _default_shard_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and "shard_size" not in data and isinstance(data.get("pairs"), int):
            return {**data, "shard_size": max(1, min(DEFAULT_SHARD_SIZE, data["pairs"]))}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> CouplingSettings:
        if self.shard_size > self.pairs:
            raise ValueError(
                f"shard_size ({self.shard_size}) is larger than pairs ({self.pairs}): choose 1 <= shard_size <= pairs"
            )
        if self.dtype == "uint8" and self.store_x0:
            raise ValueError("dtype uint8 stores x1 only: set store_x0 to false (x0 is regenerated from the seed)")
        return self


class CouplingConfig(CouplingSettings):
    """One coupling stage: the settings plus where Z0 comes from (π0 and the seed); the teacher is
    the stage's ``teacher`` input."""

    seed: int = Field(ge=0, lt=2**64)
    pi0: DistributionSpec


class ClassifierSettings(Strict):
    """``evaluate.classifier``: training of the feature classifier (digits-sized images)."""

    steps: int = Field(600, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)


class ClassifierConfig(ClassifierSettings):
    """The classifier stage: the settings and π1's labelled images."""

    data: ImagesSpec


class ImportConfig(Strict):
    """An image import (``rectiflow data import``, or a pipeline's ``import-…`` stage): ``source``
    as images of ``shape`` [C, R, R] in shards of ``shard_size``, stored as ``png`` (small, costs
    CPU to decode) or ``raw`` uint8 pixels (C·R·R bytes an image, no decoding); unreadable images
    fail the import unless ``skip_corrupt``."""

    source: str
    shape: list[int]
    shard_size: int = Field(gt=0)
    encoding: Literal["png", "raw"] = "png"
    skip_corrupt: bool = False


class EvalSettings(Strict):
    """What a pipeline sets under ``evaluate:``: samplers, sample counts, seed, figures, resources."""

    samplers: list[str] = Field(
        default_factory=lambda: ["euler@1", "euler@2", "euler@5", "euler@100", "rk45@1e-5"], validate_default=True
    )
    samples: int = Field(2000, gt=1)
    ot_samples: int = Field(1000, gt=1)
    seed: int = Field(1234, ge=0, lt=2**63)
    reference_solver: str = Field("rk45@1e-5", validate_default=True)
    trajectories: int = Field(64, ge=0)
    classifier: ClassifierSettings | None = None
    """Images: train a small classifier on π1 once (a ``classifier`` stage) and measure the
    Fréchet distance and precision/recall of samples in its feature space."""
    inception: str | None = None
    """Images: URI of InceptionV3 weights (safetensors, or a .pth read without unpickling) for
    FID, IS and KID; nothing is downloaded."""
    forward_batch: int | None = Field(None, gt=0)
    """Rows of every network call (fixed, zero-padded: it decides the bits); None: the largest
    batch whose activations fit ``memory_budget_mb``, at most 256."""
    memory_budget_mb: int = Field(2048, gt=0)
    precision: Precision = "fp32"
    workers: int = neutral(1, gt=0)
    cpus_per_worker: float = neutral(1.0, gt=0)
    gpus_per_worker: float = neutral(0.0, ge=0)

    @field_validator("samplers")
    @classmethod
    def _samplers(cls, samplers: list[str]) -> list[str]:
        if not samplers:
            raise ValueError("list at least one sampler (e.g. euler@1)")
        names = [canonical_solver(text) for text in samplers]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"samplers repeat {repeated} (after canonicalisation of {samplers})")
        return names

    @field_validator("reference_solver")
    @classmethod
    def _reference(cls, text: str) -> str:
        name = canonical_solver(text)
        if name.startswith("sde@"):
            raise ValueError(f"{name}: the reference solve must be deterministic (euler, heun or rk45)")
        return name

    @model_validator(mode="after")
    def _counts(self) -> EvalSettings:
        if self.ot_samples > self.samples:
            raise ValueError(f"ot_samples ({self.ot_samples}) must be <= samples ({self.samples})")
        if self.trajectories > self.samples:
            raise ValueError(f"trajectories ({self.trajectories}) must be <= samples ({self.samples})")
        return self


class EvalSubject(Strict):
    """The model under evaluation as the report shows it."""

    name: str = Field(min_length=1)
    """Stage name of the model, e.g. ``train-2``, ``distill-2``, ``train-vp``."""
    label: str = Field(min_length=1)
    """What the report shows, e.g. ``2-RF``, ``1-step distilled from 2-RF pairs``, ``VP ODE``."""
    family: Literal["rectified", "distilled", "baseline"]
    round: int | None = Field(None, ge=1)
    k: int | None = Field(None, ge=1)
    path: PathName = "straight"
    teacher: str | None = None
    """For a distilled model, the stage name of the flow it imitates: its reference solve then
    comes from that teacher, so the distance column measures how well the coupling was learnt."""

    @property
    def independent_pairs(self) -> bool:
        """Whether the model was trained on independent pairs (X0 ⫫ X1: a 1-RF or a baseline),
        the condition under which its velocity gives the score, −E[X0 | x]/β_t, that SDE samplers
        need. A reflow or distilled model's pairs are coupled, so its SDE rows would be wrong."""
        return self.family == "baseline" or (self.family == "rectified" and self.round == 1)


class EvalConfig(EvalSettings):
    """One evaluation stage: the settings, π0 (where Z0 comes from), π1 (what samples are compared
    with) and the ``subject``; its inputs are the ``model``, a distilled model's ``teacher`` and,
    for images measured by a classifier, the ``classifier`` stage."""

    pi0: DistributionSpec
    pi1: DistributionSpec
    subject: EvalSubject

    @model_validator(mode="after")
    def _shapes(self) -> EvalConfig:
        if list(self.pi0.shape) != list(self.pi1.shape):
            raise ValueError(f"pi0 has shape {list(self.pi0.shape)} but pi1 has shape {list(self.pi1.shape)}")
        stochastic = [name for name in self.samplers if name.startswith("sde@")]
        if stochastic and self.pi0.kind != "noise":
            raise ValueError(
                f"samplers {stochastic} need pi0 to be Gaussian noise (the SDE's score correction assumes "
                f"X0 ~ N(0, I)), but pi0 is of kind {self.pi0.kind}"
            )
        return self

    @property
    def solvers(self) -> list[str]:
        """The samplers, then the reference solver when it is not one of them."""
        return [*self.samplers, *([] if self.reference_solver in self.samplers else [self.reference_solver])]


class ReportConfig(Strict):
    """The report stage: the run's ``name``; its inputs are every other stage of the run."""

    name: str
