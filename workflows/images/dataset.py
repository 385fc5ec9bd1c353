"""Reading an imported image dataset: verified shards, random access, and small pixel helpers.

    dataset = ImageDataset.open("s3://bucket/cifar10")
    dataset.count, dataset.shape            # 50000, (3, 32, 32)
    index, images = dataset.read(dataset.shards[0])   # int64 (n,), uint8 (n, 3, 32, 32)
    batch = dataset.take([5, 17, 4096])     # uint8 (3, 3, 32, 32), reads only the shards needed
    x = to_unit_interval(flip(batch, flip_mask([5, 17, 4096], seed=0)))   # float32 in [-1, 1]

Every shard read is checked against the manifest (size, sha256, schema, rows, index range,
image sizes) and a mismatch is an :class:`ImageFormatError` naming the shard. PNGs are decoded
with Pillow; nothing is unpickled.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import ValidationError

from workflows.images.format import SCHEMA, ImageFormatError, Manifest, ShardInfo, shard_name
from workflows.shards import sha256, shard_count, shard_range
from workflows.stage import SUCCESS_FILE
from workflows.storage import Location, location


@dataclass(frozen=True)
class ImageDataset:
    """A finished image import (see :mod:`workflows.images.format`)."""

    location: Location
    manifest: Manifest
    cache_shards: int = 4

    @classmethod
    def open(cls, uri: str | Location, cache_shards: int = 4) -> "ImageDataset":
        """Read and validate ``{uri}/_SUCCESS.json``; :class:`ImageFormatError` naming the file
        when it is missing, not JSON, or not a consistent image-dataset manifest."""
        root = location(uri)
        marker = root.join(SUCCESS_FILE)
        try:
            raw = marker.read_json()
        except FileNotFoundError:
            raise ImageFormatError(
                f"{marker.uri} does not exist: {root.uri} is not a finished image import "
                "(run `rectiflow data import` to completion first)"
            ) from None
        except ValueError as error:  # read_json's message names the file
            raise ImageFormatError(str(error)) from None
        if not isinstance(raw, dict) or raw.get("kind") != "image-dataset":
            kind = raw.get("kind") if isinstance(raw, dict) else type(raw).__name__
            raise ImageFormatError(f"{marker.uri} is not an image-dataset manifest (kind {kind!r})")
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, item['loc'])) or '(top)'}: {item['msg']}" for item in error.errors()
            )
            raise ImageFormatError(f"{marker.uri} has invalid fields: {problems}") from None
        _check_layout(manifest, marker.uri)
        return cls(root, manifest, cache_shards)

    # -- what it holds ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Images stored (source images minus skipped ones)."""
        return self.manifest.count

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, R, R) of one image."""
        channels, height, width = self.manifest.shape
        return channels, height, width

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        """The shards in order (``name``, ``start``, ``stop``, ``rows``, ``sha256``, ``bytes``)."""
        return tuple(self.manifest.shards)

    @property
    def classes(self) -> list[str] | None:
        """Class-folder names (label i is classes[i]); None for array sources."""
        return self.manifest.classes

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [item.model_dump() for item in self.manifest.skipped]

    # -- reading ---------------------------------------------------------------------------

    def _table(self, entry: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        target = self.location.join(entry.name)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise ImageFormatError(f"shard {target.uri} listed in the manifest is missing") from None
        if len(data) != entry.bytes or sha256(data) != entry.sha256:
            raise ImageFormatError(
                f"shard {target.uri} does not match the manifest ({len(data)} bytes, expected {entry.bytes}; "
                "sha256 mismatch): it was changed or truncated after the import finished; "
                "delete it and re-run the import to rewrite it"
            )
        try:
            table = pq.read_table(pa.BufferReader(data), columns=columns)
        except (pa.ArrowInvalid, OSError) as error:
            raise ImageFormatError(f"shard {target.uri} is not a readable Parquet file: {error}") from None
        expected = SCHEMA if columns is None else pa.schema([SCHEMA.field(name) for name in columns])
        if not table.schema.remove_metadata().equals(expected):
            raise ImageFormatError(f"shard {target.uri} has schema {table.schema.remove_metadata()}, expected {expected}")
        if table.num_rows != entry.rows:
            raise ImageFormatError(f"shard {target.uri} holds {table.num_rows} rows, the manifest says {entry.rows}")
        return table

    def read(self, entry: ShardInfo) -> tuple[np.ndarray, np.ndarray]:
        """(source indices int64 (n,), images uint8 (n, C, R, R)) of one shard, verified."""
        target = self.location.join(entry.name).uri
        table = self._table(entry)
        index = _indices(table, entry, target)
        channels, height, width = self.shape
        if not (np.all(table.column("height").to_numpy() == height) and np.all(table.column("width").to_numpy() == width)):
            raise ImageFormatError(f"shard {target} lists image sizes other than {height}x{width}")
        mode = "L" if channels == 1 else "RGB"
        images = np.empty((entry.rows, channels, height, width), dtype=np.uint8)
        for row, blob in enumerate(table.column("image").to_pylist()):
            try:
                with Image.open(io.BytesIO(blob)) as image:
                    image.load()
                    if image.format != "PNG" or image.mode != mode or image.size != (width, height):
                        raise ImageFormatError(
                            f"shard {target}: image of index {index[row]} is a {image.format} {image.mode} "
                            f"{image.size[0]}x{image.size[1]} image, expected PNG {mode} {width}x{height}"
                        )
                    pixels = np.asarray(image)
            except (OSError, SyntaxError, ValueError) as error:
                if isinstance(error, ImageFormatError):
                    raise
                raise ImageFormatError(f"shard {target}: image of index {index[row]} does not decode ({error})") from None
            images[row] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        return index, images

    def labels(self) -> np.ndarray:
        """int64 (count,) labels in position order (−1: none). Reads (and verifies) each shard's
        bytes but decodes only the ``index`` and ``label`` columns."""
        parts = []
        for entry in self.shards:
            table = self._table(entry, ["index", "label"])
            _indices(table, entry, self.location.join(entry.name).uri)
            parts.append(table.column("label").to_numpy().astype(np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def positions_to_shards(self, positions: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row within it) of each dataset position 0 … count−1."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= self.count):
            bad = positions[(positions < 0) | (positions >= self.count)][0]
            raise IndexError(f"position {int(bad)} is outside the dataset's [0, {self.count})")
        starts = np.concatenate([[0], np.cumsum([entry.rows for entry in self.shards])])
        shard = np.searchsorted(starts, positions, side="right") - 1
        return shard, positions - starts[shard]

    def take(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 (len, C, R, R) images at dataset positions (0 … count−1: the stored rows in
        index order, equal to the source index when nothing was skipped). Reads only the shards
        holding them and keeps the last ``cache_shards`` decoded shards."""
        shard, row = self.positions_to_shards(positions)
        out = np.empty((len(shard), *self.shape), dtype=np.uint8)
        for number in np.unique(shard):
            chosen = shard == number
            out[chosen] = self._decoded(int(number))[row[chosen]]
        return out

    def _decoded(self, number: int) -> np.ndarray:
        cache: OrderedDict[int, np.ndarray] = self.__dict__.setdefault("_cache", OrderedDict())
        if number in cache:
            cache.move_to_end(number)
            return cache[number]
        _, images = self.read(self.shards[number])
        cache[number] = images
        while len(cache) > max(1, self.cache_shards):
            cache.popitem(last=False)
        return images


def _indices(table: pa.Table, entry: ShardInfo, target: str) -> np.ndarray:
    index = table.column("index").to_numpy().astype(np.int64)
    if index.size and (index[0] < entry.start or index[-1] >= entry.stop or np.any(np.diff(index) <= 0)):
        raise ImageFormatError(
            f"shard {target} holds indices outside [{entry.start}, {entry.stop}) or out of order"
        )
    return index


def _check_layout(manifest: Manifest, where: str) -> None:
    """Shards 0 … n−1 covering source positions [0, files) once each in order; rows and skipped
    files adding up."""
    files, size = manifest.source.files, manifest.settings.shard_size
    expected = [(i, shard_name(i), *shard_range(i, size, files)) for i in range(shard_count(files, size))]
    found = [(entry.index, entry.name, entry.start, entry.stop) for entry in manifest.shards]
    if found != expected:
        raise ImageFormatError(
            f"{where}: the shards are not {shard_name(0)} … covering source positions [0, {files}) in order of {size}"
        )
    problems = []
    if any(entry.rows > entry.stop - entry.start for entry in manifest.shards):
        problems.append("a shard lists more rows than its range")
    if sum(entry.rows for entry in manifest.shards) != manifest.count:
        problems.append(f"count {manifest.count} is not the sum of the shards' rows")
    if manifest.skipped_count != len(manifest.skipped) or manifest.count + manifest.skipped_count != files:
        problems.append(f"count {manifest.count} + skipped {manifest.skipped_count} is not the {files} source images")
    resolution, channels = manifest.resolution, manifest.channels
    if manifest.shape != [channels, resolution, resolution] or (manifest.settings.resolution, manifest.settings.channels) != (resolution, channels):
        problems.append(f"shape {manifest.shape} disagrees with resolution {resolution} and channels {channels}")
    if problems:
        raise ImageFormatError(f"{where} is inconsistent: {'; '.join(problems)}")


# -- pixel helpers ---------------------------------------------------------------------------------


def to_unit_interval(images: Any) -> Any:
    """uint8 pixels → float32 in [−1, 1]: x / 127.5 − 1 (numpy array or torch tensor)."""
    if hasattr(images, "numpy") and hasattr(images, "float"):  # a torch tensor
        return images.float() / 127.5 - 1.0
    return (np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def flip(images: Any, mask: Sequence[bool] | np.ndarray) -> Any:
    """``images`` (n, C, H, W) with the rows where ``mask`` is true mirrored left–right (a copy;
    numpy array or torch tensor)."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    if mask.shape[0] != images.shape[0]:
        raise ValueError(f"flip mask has {mask.shape[0]} entries for {images.shape[0]} images")
    if hasattr(images, "flip") and hasattr(images, "clone"):  # a torch tensor
        import torch

        chosen = torch.from_numpy(mask)
        out = images.clone()
        out[chosen] = images[chosen].flip(-1)
        return out
    out = np.array(images, copy=True)
    out[mask] = out[mask][..., ::-1]
    return out


def flip_mask(indices: Sequence[int] | np.ndarray, seed: int, epoch: int = 0) -> np.ndarray:
    """A deterministic coin per (seed, epoch, index): the same image gets the same flip in a
    given epoch whatever the batch, worker or order (SplitMix64 of the three, lowest bit)."""
    with np.errstate(over="ignore"):
        x = np.asarray(indices, dtype=np.uint64).reshape(-1)
        x = x + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch & 0xFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x & np.uint64(1)).astype(bool)
