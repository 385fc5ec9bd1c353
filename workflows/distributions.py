"""Drawing examples of π0 and π1 (:mod:`workflows.settings.data`): Gaussian noise of a shape, a 2D
toy distribution, or images.

Two ways, both deterministic, so any worker can make example ``i`` without coordination and a
re-run makes the same example again:

- **by id** (:func:`sample_by_id`): example ``i`` is a pure function of (spec, seed, i) — noise
  from :mod:`rf.noise` (drawn on any device, where the model runs), a toy of :mod:`rf.toy`, or an
  image: example g is image perm_e(g mod N) of the N kept images, e = g div N, perm_e the argsort
  of counter-based uniforms keyed by (seed, e). Images by id are random access (each call reads
  whole the shards it touches, :class:`ImagePool`): right for evaluation samples and small
  datasets, not for training input at scale;
- **as a stream** (:class:`ImageShards`): an imported dataset as a shard set that a training
  stream reads shard by shard, each shard once per epoch (:mod:`workflows.shard_windows`).

Either way an image example is flipped left–right when ``spec.flip`` and its coin
u(seed, example, ``image_flip``) < ½ (:func:`flip_coins`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from rf.noise import STREAMS, Device, noise, uniform
from rf.toy import make_toy
from workflows.settings import ImagesSpec, NoiseSpec, ToySpec
from workflows.shard_windows import copy_rows

if TYPE_CHECKING:
    from workflows.images import ImageDataset
    from workflows.shard_format import ShardEntry


IMAGE_CACHE_BYTES = 2 << 30
"""Decoded uint8 shards an image reader keeps (all of CIFAR-10; about ten 1000-image shards at 256²)."""
_LABEL_TASKS = 16


def flip_coins(seed: int, examples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Whether each example is mirrored: u(seed, example, image_flip) < ½, a bool tensor drawn on
    the device of a tensor ``examples`` (the same coins on every device: uniforms are exact)."""
    return uniform(seed, examples, stream=STREAMS.image_flip) < 0.5


def open_images(uri: str, shape: tuple[int, ...]) -> ImageDataset:
    """The import at ``uri`` (its manifest only), checked to hold images of ``shape``."""
    from workflows.images import ImageDataset  # Pillow and pyarrow only when images are used

    dataset = ImageDataset.open(uri)
    if tuple(dataset.shape) != tuple(shape):
        raise ValueError(f"{uri} holds images of shape {list(dataset.shape)}, the pipeline declares {list(shape)}")
    return dataset


def _imported(spec: ImagesSpec) -> str:
    if spec.uri is None:
        raise ValueError(f"images from {spec.source!r} must be imported before they are read")
    return spec.uri


class ImagePool:
    """The kept images of an imported dataset in one process: verified shards, decoded lazily."""

    def __init__(self, uri: str, shape: tuple[int, ...], labels: tuple[int, ...] | None):
        dataset = open_images(uri, shape)
        largest = max((entry.rows for entry in dataset.shards), default=1) * int(np.prod(shape))
        self.dataset = dataclasses.replace(dataset, cache_shards=max(2, min(64, IMAGE_CACHE_BYTES // max(1, largest))))
        positions = np.arange(self.dataset.count)
        if labels is not None:
            positions = positions[np.isin(self.dataset.labels(), labels)]
            if not len(positions):
                raise ValueError(f"{uri} holds no image with a label in {list(labels)}")
        self.positions = positions
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The dataset positions in epoch ``epoch``'s order (the last few epochs' are kept)."""
        key = (seed, epoch)
        if key not in self._orders:
            if len(self._orders) >= 8:
                self._orders.pop(next(iter(self._orders)))
            keys = uniform(seed, np.arange(len(self.positions)), stream=STREAMS.image_epoch(epoch)).numpy()
            self._orders[key] = self.positions[np.argsort(keys, kind="stable")]
        return self._orders[key]

    def sample(self, spec: ImagesSpec, seed: int, ids: np.ndarray) -> torch.Tensor:
        ids = np.asarray(ids, dtype=np.int64)
        epochs, within = np.divmod(ids, len(self.positions))
        chosen = np.empty(len(ids), dtype=np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            chosen[rows] = self.epoch_order(seed, int(epoch))[within[rows]]
        from workflows.images import flip, to_unit_interval

        images = to_unit_interval(torch.from_numpy(self.dataset.take(chosen)))
        return flip(images, flip_coins(seed, ids)) if spec.flip else images


def image_pool(spec: ImagesSpec) -> ImagePool:
    """The process-wide :class:`ImagePool` of ``spec`` (opened once per worker)."""
    return _pool(_imported(spec), tuple(spec.shape), tuple(spec.labels) if spec.labels is not None else None)


_pool = functools.lru_cache(maxsize=4)(ImagePool)


def _labels(data: bytes, source: str) -> np.ndarray:
    from workflows.shard_format import read_table

    return read_table(data, source, ["label"]).column("label").to_numpy()


def _count_labels(dataset: ImageDataset, entries: list[ShardEntry], labels: tuple[int, ...]) -> list[int]:
    """Rows of each shard with a label in ``labels`` (its bytes verified, only the label column read)."""
    return [
        int(np.isin(_labels(dataset.shard_bytes(entry), dataset.shard_uri(entry)), labels).sum()) for entry in entries
    ]


@dataclasses.dataclass(frozen=True)
class ImageShards:
    """An imported dataset as a :class:`~workflows.shard_windows.ShardSet`: shard s gives the
    dataset positions (``id``) and uint8 pixels (``image``) of its images whose label is in
    ``labels`` (all of them when None), verified against the manifest."""

    dataset: ImageDataset
    labels: tuple[int, ...] | None
    rows: tuple[int, ...]

    @classmethod
    def open(cls, spec: ImagesSpec) -> ImageShards:
        """``spec``'s import: the manifest, and with ``labels`` the rows each shard keeps, counted
        from the label columns in parallel Ray tasks (in this process without Ray)."""
        dataset = open_images(_imported(spec), tuple(spec.shape))
        if spec.labels is None:
            return cls(dataset, None, tuple(entry.rows for entry in dataset.shards))
        labels = tuple(spec.labels)
        groups = [list(dataset.shards[i::_LABEL_TASKS]) for i in range(min(_LABEL_TASKS, len(dataset.shards)))]
        import ray

        if ray.is_initialized():
            task, shared = ray.remote(num_cpus=0.25)(_count_labels), ray.put(dataset)
            counts = ray.get([task.remote(shared, group, labels) for group in groups])
        else:
            counts = [_count_labels(dataset, group, labels) for group in groups]
        rows = [0] * len(dataset.shards)
        for i, group in enumerate(counts):
            rows[i::_LABEL_TASKS] = group
        if not sum(rows):
            raise ValueError(f"{spec.uri} holds no image with a label in {list(labels)}")
        return cls(dataset, labels, tuple(rows))

    @property
    def columns(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {"image": (np.dtype(np.uint8), tuple(self.dataset.shape))}

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.dataset.shape)) + 8

    @functools.cached_property
    def _first_position(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([entry.rows for entry in self.dataset.shards])])

    def read(self, shard: int, out: dict[str, np.ndarray]) -> None:
        """Positions and pixels of shard ``shard``'s kept images into ``out`` (decoded straight into
        it when every image is kept); :class:`ImageFormatError` naming the shard when its bytes or
        an image do not check out."""
        from workflows.images import decode_shard

        entry = self.dataset.shards[shard]
        data, source = self.dataset.shard_bytes(entry), self.dataset.shard_uri(entry)
        shape, encoding = self.dataset.shape, self.dataset.encoding
        positions = self._first_position[shard] + np.arange(entry.rows)
        if self.labels is None:
            decode_shard(data, entry, shape, encoding, source, out["image"])
            out["id"][...] = positions
            return
        _, images = decode_shard(data, entry, shape, encoding, source)
        keep = np.isin(_labels(data, source), self.labels)
        copy_rows(out, {"id": positions[keep], "image": images[keep]}, source)


def sample_by_id(
    spec: NoiseSpec | ToySpec | ImagesSpec, seed: int, ids: np.ndarray | torch.Tensor, device: Device = None
) -> torch.Tensor:
    """Examples ``ids`` of the distribution, float32 of shape (len(ids), *spec.shape); images in
    [−1, 1]. On ``device`` (default: the CPU, or the device of a tensor ``ids`` for noise): noise
    is drawn there (the same numbers as on the CPU, see :mod:`rf.noise`); toys and images are
    made on the CPU and moved."""
    if isinstance(spec, NoiseSpec):
        return noise(seed, ids, spec.shape, device=device)
    host = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if isinstance(spec, ImagesSpec):
        values = image_pool(spec).sample(spec, seed, host)
    else:
        values = make_toy(spec.name, **spec.options).sample(seed, host)
    return values if device is None else values.to(device)
