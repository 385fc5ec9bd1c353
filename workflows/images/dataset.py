"""Reading an imported image dataset: verified shards, random access, and small pixel helpers.

    dataset = ImageDataset.open("s3://bucket/cifar10")
    dataset.count, dataset.shape            # 50000, (3, 32, 32)
    index, images = dataset.read(dataset.shards[0])   # int64 (n,), uint8 (n, 3, 32, 32)
    batch = dataset.take([5, 17, 4096])     # uint8 (3, 3, 32, 32), reads only the shards needed
    x = to_unit_interval(flip(batch, flip_mask([5, 17, 4096], seed=0)))   # float32 in [-1, 1]

Opening reads the manifest only. Every shard read is checked against it (size, sha256, schema,
rows, index range, image sizes, decodability) and a mismatch is an :class:`ImageFormatError`
naming the shard. A shard stream reads with :meth:`ImageDataset.shard_bytes` (verified bytes) and
decodes with :func:`decode_shard` (PNG with Pillow, raw pixels without a copy) wherever it likes;
:meth:`ImageDataset.read` is the two together. Nothing is unpickled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from workflows.images.format import STAGE_KIND, Encoding, ImageFormatError, ImportDetails, decode_images, schema
from workflows.manifest import SUCCESS_FILE, Manifest, ManifestError, StageNotFinished, read_manifest
from workflows.shard_format import ShardEntry, ShardError, read_table
from workflows.storage import Location, location


@dataclass(frozen=True)
class ImageDataset:
    """A finished image import (see :mod:`workflows.images.format`)."""

    location: Location
    manifest: Manifest
    details: ImportDetails
    cache_shards: int = 4

    @classmethod
    def open(cls, uri: str | Location, cache_shards: int = 4) -> ImageDataset:
        """Read and validate ``{uri}/_SUCCESS.json``; :class:`ImageFormatError` naming the file
        when it is missing, not JSON, not an import's manifest, or inconsistent."""
        root = location(uri)
        marker = root.join(SUCCESS_FILE).uri
        try:
            manifest = read_manifest(root)
        except StageNotFinished:
            raise ImageFormatError(
                f"{marker} does not exist: {root.uri} is not a finished image import "
                "(run `rectiflow data import` to completion first)"
            ) from None
        except (ManifestError, ValueError) as error:  # their messages name the file
            raise ImageFormatError(str(error)) from None
        if manifest.kind != STAGE_KIND:
            raise ImageFormatError(f"{marker} is the manifest of a {manifest.kind!r} stage, not of an image import")
        return cls(root, manifest, ImportDetails.parse(manifest.details, marker), cache_shards)

    # -- what it holds ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Images stored (source images minus skipped ones)."""
        return self.details.count

    def __len__(self) -> int:
        return self.details.count

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, R, R) of one image."""
        channels, height, width = self.details.shape
        return channels, height, width

    @property
    def encoding(self) -> Encoding:
        """How the pixels are stored: ``png`` or ``raw`` uint8."""
        return self.details.encoding

    @property
    def shards(self) -> tuple[ShardEntry, ...]:
        """The shards in order (``name``, ``start``, ``stop``, ``rows``, ``sha256``, ``bytes``)."""
        return tuple(self.details.shards)

    @property
    def classes(self) -> list[str] | None:
        """Class-folder names (label i is classes[i]); None for array sources."""
        return self.details.classes

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [item.model_dump() for item in self.details.skipped]

    # -- reading ---------------------------------------------------------------------------

    def shard_uri(self, entry: ShardEntry) -> str:
        return self.location.join(entry.name).uri

    def shard_bytes(self, entry: ShardEntry) -> bytes:
        """The bytes of one shard, checked against the manifest (size and sha256)."""
        target = self.shard_uri(entry)
        try:
            data = self.location.join(entry.name).read_bytes()
        except FileNotFoundError:
            raise ImageFormatError(f"shard {target} listed in the manifest is missing") from None
        try:
            entry.check_bytes(data, target)
        except ShardError as error:
            raise ImageFormatError(f"{error}; delete it and re-run the import to rewrite it") from None
        return data

    def read(self, entry: ShardEntry) -> tuple[np.ndarray, np.ndarray]:
        """(source indices int64 (n,), images uint8 (n, C, R, R)) of one shard, verified."""
        return decode_shard(self.shard_bytes(entry), entry, self.shape, self.encoding, self.shard_uri(entry))

    def labels(self) -> np.ndarray:
        """int64 (count,) labels in position order (−1: none). Reads (and verifies) each shard's
        bytes but decodes only the ``index`` and ``label`` columns."""
        parts = []
        for entry in self.shards:
            table = _table(
                self.shard_bytes(entry), entry, self.shape, self.encoding, self.shard_uri(entry), ["index", "label"]
            )
            _indices(table, entry, self.shard_uri(entry))
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


def decode_shard(
    data: bytes,
    entry: ShardEntry,
    shape: tuple[int, int, int],
    encoding: Encoding,
    source: str,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(source indices int64 (n,), images uint8 (n, C, R, R)) of a shard's bytes (already checked
    against ``entry`` by :meth:`ImageDataset.shard_bytes`): schema, rows, index range, image sizes
    and every image checked; :class:`ImageFormatError` naming ``source`` otherwise. The images are
    written into ``out`` when given (n rows), else raw pixels are a read-only view of the decoded
    Parquet buffer."""
    table = _table(data, entry, shape, encoding, source)
    index = _indices(table, entry, source)
    _, height, width = shape
    if not (np.all(table.column("height").to_numpy() == height) and np.all(table.column("width").to_numpy() == width)):
        raise ImageFormatError(f"shard {source} lists image sizes other than {height}x{width}")
    return index, decode_images(table.column("image"), encoding, shape, index, source, out)


def _table(
    data: bytes,
    entry: ShardEntry,
    shape: tuple[int, int, int],
    encoding: Encoding,
    source: str,
    columns: list[str] | None = None,
) -> pa.Table:
    """The shard's table (or ``columns`` of it) with the schema of ``encoding`` and the manifest's rows."""
    try:
        table = read_table(data, source, columns)
    except ShardError as error:
        raise ImageFormatError(str(error)) from None
    full = schema(encoding, shape)
    expected = full if columns is None else pa.schema([full.field(name) for name in columns])
    found = table.schema.remove_metadata()
    if not found.equals(expected):
        raise ImageFormatError(f"shard {source} has columns ({_columns(found)}), expected ({_columns(expected)})")
    if table.num_rows != entry.rows:
        raise ImageFormatError(f"shard {source} holds {table.num_rows} rows, the manifest says {entry.rows}")
    return table


def _columns(fields: pa.Schema) -> str:
    return ", ".join(f"{field.name} {field.type}" for field in fields)


def _indices(table: pa.Table, entry: ShardEntry, source: str) -> np.ndarray:
    index = table.column("index").to_numpy().astype(np.int64)
    if index.size and (index[0] < entry.start or index[-1] >= entry.stop or np.any(np.diff(index) <= 0)):
        raise ImageFormatError(f"shard {source} holds indices outside [{entry.start}, {entry.stop}) or out of order")
    return index


# -- pixel helpers ---------------------------------------------------------------------------------


def to_unit_interval(images: Any) -> Any:
    """uint8 pixels → float32 in [−1, 1]: x / 127.5 − 1 (numpy array or torch tensor)."""
    if hasattr(images, "numpy") and hasattr(images, "float"):  # a torch tensor
        return images.float() / 127.5 - 1.0
    return (np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def flip(images: Any, mask: Any) -> Any:
    """``images`` (n, C, H, W) with the rows where ``mask`` is true mirrored left–right (a copy):
    a numpy array, or a torch tensor on any device (the mask moved to it)."""
    is_tensor = hasattr(images, "flip") and hasattr(images, "clone")
    if is_tensor:
        import torch

        chosen = torch.as_tensor(mask, dtype=torch.bool, device=images.device).reshape(-1)
    else:
        chosen = np.asarray(mask, dtype=bool).reshape(-1)
    if chosen.shape[0] != images.shape[0]:
        raise ValueError(f"flip mask has {chosen.shape[0]} entries for {images.shape[0]} images")
    if is_tensor:
        return torch.where(chosen.view(-1, *[1] * (images.dim() - 1)), images.flip(-1), images)
    out = np.array(images, copy=True)
    out[chosen] = out[chosen][..., ::-1]
    return out


def flip_mask(indices: Sequence[int] | np.ndarray, seed: int, epoch: int = 0) -> np.ndarray:
    """A deterministic coin per (seed, epoch, index): the same image gets the same flip in a
    given epoch whatever the batch, worker or order (SplitMix64 of the three, lowest bit)."""
    with np.errstate(over="ignore"):
        x = np.asarray(indices, dtype=np.uint64).reshape(-1)
        x = (
            x
            + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
            + np.uint64(epoch & 0xFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        )
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x & np.uint64(1)).astype(bool)
