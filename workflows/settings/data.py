"""π0 and π1 (Gaussian noise, a 2D toy, images) and where a training stage's pairs come from.

Distributions are sampled by example id (see :mod:`workflows.distributions`), so any worker can
draw example ``i`` without coordination and a re-run draws the same example again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from rf.options.solvers import SolverSpec
from rf.options.toy import toy_options
from workflows.settings.base import Strict
from workflows.storage import StorageError, location


def _positive_shape(shape: list[int]) -> list[int]:
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"shape must be a non-empty list of positive sizes, got {shape}")
    return shape


class NoiseSpec(Strict):
    """Standard Gaussian noise N(0, I) of ``shape`` (e.g. [2] or [3, 32, 32])."""

    kind: Literal["noise"] = "noise"
    shape: list[int]

    _shape = field_validator("shape")(_positive_shape)


class ToySpec(Strict):
    """A 2D toy distribution of :mod:`rf.toy` (``name`` with keyword ``options``)."""

    kind: Literal["toy"] = "toy"
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> ToySpec:
        toy_options(self.name, **self.options)
        return self

    @property
    def shape(self) -> list[int]:
        return [2]


class ImagesSpec(Strict):
    """Images of shape [C, R, R]: a dataset written by ``rectiflow data import`` at ``uri``, or a
    ``source`` the pipeline imports first into its own ``import-…`` stage (a folder, zip, .npz /
    .npy of uint8 images, or ``sklearn:digits``). ``labels`` keeps only those classes (one domain
    of an unpaired transfer); ``flip`` mirrors each drawn example with probability ½ (the paper's
    augmentation; off for digits). ``shard_size`` and ``encoding`` (png or raw uint8) are how a
    ``source`` is imported."""

    kind: Literal["images"] = "images"
    shape: list[int]
    uri: str | None = None
    source: str | None = None
    labels: list[int] | None = None
    flip: bool = True
    shard_size: int = Field(1000, gt=0)
    encoding: Literal["png", "raw"] = "png"
    imported_by: str | None = None
    """Set by the plan, not by users: the hash of the ``import-…`` stage that wrote ``uri``."""

    _shape = field_validator("shape")(_positive_shape)

    @model_validator(mode="after")
    def _one_place(self) -> ImagesSpec:
        if len(self.shape) != 3 or self.shape[1] != self.shape[2] or self.shape[0] not in (1, 3):
            raise ValueError(f"shape must be [C, R, R] with C 1 or 3, got {self.shape}")
        if (self.uri is None) == (self.source is None):
            raise ValueError("give exactly one of uri (an imported dataset) or source (to import)")
        if self.uri is not None:
            try:
                object.__setattr__(self, "uri", location(self.uri).uri)
            except StorageError as error:
                raise ValueError(f"uri: {error}") from None
        if self.labels is not None and not self.labels:
            raise ValueError("labels must list at least one class (or be left out for all)")
        return self

    def at(self, uri: str, import_hash: str) -> ImagesSpec:
        """This ``source`` spec reading its import at ``uri``, written by the stage ``import_hash``."""
        return self.model_copy(update={"uri": location(uri).uri, "source": None, "imported_by": import_hash})

    def identity(self) -> dict[str, Any]:
        """For a pipeline's own import, the import stage's hash stands for the location (so hashes
        do not depend on the storage root)."""
        identity = super().identity()
        del identity["uri" if self.imported_by is not None else "imported_by"]
        return identity


DistributionSpec = Annotated[NoiseSpec | ToySpec | ImagesSpec, Field(discriminator="kind")]


class IndependentPairs(Strict):
    """X0 ~ π0 and X1 ~ π1 drawn independently by example id, with seeds ``seed0``, ``seed1``
    (1-RF, the baselines, distillation of random pairs)."""

    kind: Literal["independent"] = "independent"
    pi0: DistributionSpec
    pi1: DistributionSpec
    seed0: int = Field(ge=0)
    seed1: int = Field(ge=0)

    @property
    def shape(self) -> list[int]:
        return list(self.pi1.shape)


class OnlinePairs(Strict):
    """X0 ~ π0 by example id and X1 = the flow of the stage's ``teacher`` input from X0, solved
    when the row is read (online reflow: no shards; every epoch pays the ODE again)."""

    kind: Literal["online"] = "online"
    pi0: DistributionSpec
    seed: int = Field(ge=0)
    solver: str = "rk45@1e-5"
    forward_batch: int = Field(256, gt=0)

    _solver = field_validator("solver")(lambda text: SolverSpec.parse(text).name)

    @property
    def shape(self) -> list[int]:
        return list(self.pi0.shape)


class CoupledPairs(Strict):
    """(X0, X1) read from the shards of the stage's ``coupling`` input."""

    kind: Literal["coupling"] = "coupling"


PairSource = Annotated[IndependentPairs | OnlinePairs | CoupledPairs, Field(discriminator="kind")]
