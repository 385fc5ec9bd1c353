"""π0 and π1 as configuration: Gaussian noise of a shape, a 2D toy distribution, or images.

All are sampled by example id (:mod:`rf.noise`, :mod:`rf.toy`, :class:`ImagesSpec`), so any worker
can draw example ``i`` without coordination and a re-run draws the same example again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import dataclasses
import functools

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rf.noise import noise, uniform
from rf.toy import make_toy
from workflows.storage import StorageError, location


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def identity(self) -> dict[str, Any]:
        """What decides the distribution's examples, for stage hashes."""
        return self.model_dump(mode="json")


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


class ImagesSpec(_Spec):
    """Images of shape [C, R, R]: a dataset written by ``rectiflow data import`` at ``uri``, or a
    ``source`` the pipeline imports first into its own ``import-…`` stage (a folder, zip, .npz /
    .npy of uint8 images, or ``sklearn:digits``). ``labels`` keeps only those classes (one domain
    of an unpaired transfer); ``flip`` mirrors each drawn example with probability ½ (the paper's
    augmentation; off for digits).

    Example g is image perm_e(g mod N) of the N kept images, e = g div N, with perm_e the argsort
    of counter-based uniforms keyed by (seed, epoch e): every epoch visits each image once."""

    kind: Literal["images"] = "images"
    shape: list[int]
    uri: str | None = None
    source: str | None = None
    labels: list[int] | None = None
    flip: bool = True
    shard_size: int = Field(1000, gt=0)

    _positive = field_validator("shape")(NoiseSpec._positive.__func__)

    @model_validator(mode="after")
    def _one_place(self) -> "ImagesSpec":
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

    imported_by: str | None = None
    """Set by the plan, not by users: the hash of the ``import-…`` stage that wrote ``uri``."""

    def at(self, uri: str, import_hash: str) -> "ImagesSpec":
        """This ``source`` spec reading its import at ``uri``, written by the stage ``import_hash``."""
        return self.model_copy(update={"uri": location(uri).uri, "source": None, "imported_by": import_hash})

    def identity(self) -> dict[str, Any]:
        """What decides the examples: for a pipeline's own import, the import stage's hash stands
        for the location (so hashes do not depend on the storage root)."""
        if self.imported_by is None:
            return self.model_dump(mode="json", exclude={"imported_by"})
        return self.model_dump(mode="json", exclude={"uri"})


DistributionSpec = Annotated[Union[NoiseSpec, ToySpec, ImagesSpec], Field(discriminator="kind")]

IMAGE_CACHE_BYTES = 2 << 30
"""Decoded uint8 shards an image reader keeps (all of CIFAR-10; about ten 1000-image shards at 256²)."""
_STREAM_EPOCH = 40
_STREAM_FLIP = 41


class ImagePool:
    """The kept images of an imported dataset in one process: verified shards, decoded lazily."""

    def __init__(self, uri: str, shape: tuple[int, ...], labels: tuple[int, ...] | None):
        from workflows.images import ImageDataset  # Pillow and pyarrow only when images are used

        dataset = ImageDataset.open(uri)
        largest = max((entry.rows for entry in dataset.shards), default=1) * int(np.prod(shape))
        self.dataset = dataclasses.replace(dataset, cache_shards=max(2, min(64, IMAGE_CACHE_BYTES // max(1, largest))))
        if tuple(self.dataset.shape) != shape:
            raise ValueError(f"{uri} holds images of shape {list(self.dataset.shape)}, the pipeline declares {list(shape)}")
        positions = np.arange(self.dataset.count)
        if labels is not None:
            positions = positions[np.isin(self.dataset.labels(), labels)]
            if not len(positions):
                raise ValueError(f"{uri} holds no image with a label in {list(labels)}")
        self.positions = positions

    @functools.lru_cache(maxsize=8)
    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        keys = uniform(seed, np.arange(len(self.positions)), stream=_STREAM_EPOCH + 64 * epoch).numpy()
        return self.positions[np.argsort(keys, kind="stable")]

    def sample(self, spec: ImagesSpec, seed: int, ids: np.ndarray) -> torch.Tensor:
        ids = np.asarray(ids, dtype=np.int64)
        epochs, within = np.divmod(ids, len(self.positions))
        chosen = np.empty(len(ids), dtype=np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            chosen[rows] = self.epoch_order(seed, int(epoch))[within[rows]]
        from workflows.images import flip, to_unit_interval

        images = to_unit_interval(torch.from_numpy(self.dataset.take(chosen)))
        if spec.flip:
            images = flip(images, uniform(seed, ids, stream=_STREAM_FLIP).numpy() < 0.5)
        return images


def image_pool(spec: ImagesSpec) -> ImagePool:
    """The process-wide :class:`ImagePool` of ``spec`` (opened once per worker)."""
    if spec.uri is None:
        raise ValueError(f"images from {spec.source!r} must be imported before they are read")
    return _pool(spec.uri, tuple(spec.shape), tuple(spec.labels) if spec.labels is not None else None)


_pool = functools.lru_cache(maxsize=4)(ImagePool)


def sample_by_id(spec: NoiseSpec | ToySpec | ImagesSpec, seed: int, ids: np.ndarray) -> torch.Tensor:
    """Examples ``ids`` of the distribution, float32 of shape (len(ids), *spec.shape); images in [−1, 1]."""
    if isinstance(spec, NoiseSpec):
        return noise(seed, ids, spec.shape)
    if isinstance(spec, ImagesSpec):
        return image_pool(spec).sample(spec, seed, np.asarray(ids))
    return make_toy(spec.name, **spec.options).sample(seed, ids)
