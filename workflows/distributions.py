"""π0 and π1 as configuration: Gaussian noise of a shape, or a 2D toy distribution.

Both are sampled by example id (:mod:`rf.noise`, :mod:`rf.toy`), so any worker can draw example
``i`` without coordination and a re-run draws the same example again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rf.noise import noise
from rf.toy import make_toy


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoiseSpec(_Spec):
    """Standard Gaussian noise N(0, I) of ``shape`` (e.g. [2] or [3, 32, 32])."""

    kind: Literal["noise"] = "noise"
    shape: list[int]

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if not shape or any(n < 1 for n in shape):
            raise ValueError(f"shape must be a non-empty list of positive sizes, got {shape}")
        return shape


class ToySpec(_Spec):
    """A 2D toy distribution of :mod:`rf.toy` (``name`` with keyword ``options``)."""

    kind: Literal["toy"] = "toy"
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> "ToySpec":
        make_toy(self.name, **self.options)
        return self

    @property
    def shape(self) -> list[int]:
        return [2]


DistributionSpec = Annotated[Union[NoiseSpec, ToySpec], Field(discriminator="kind")]


def sample_by_id(spec: NoiseSpec | ToySpec, seed: int, ids: np.ndarray) -> torch.Tensor:
    """Examples ``ids`` of the distribution, float32 of shape (len(ids), *spec.shape)."""
    if isinstance(spec, NoiseSpec):
        return noise(seed, ids, spec.shape)
    return make_toy(spec.name, **spec.options).sample(seed, ids)
