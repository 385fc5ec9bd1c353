"""The image dataset format shared by the importer and the reader.

A dataset is a folder (any fsspec URI) holding Parquet shards ``part-00000.parquet`` … and, written
last, ``_SUCCESS.json`` (the manifest). Shard ``s`` covers the *source positions*
[s·S, min((s+1)·S, N)) of the N images listed from the source in sorted order (S = shard size).

Columns (one row per image, in increasing ``index``):

- ``index`` int64 — the image's source position (its rank in the sorted source listing);
- ``image`` binary — PNG bytes, 8-bit ``L`` (1 channel) or ``RGB`` (3 channels), R×R;
- ``label`` int64 — the class index (sorted class-folder name), the array label, or −1;
- ``height``, ``width`` int32 — the stored image size (always R, R);
- ``source`` string — where the image came from, relative to the source: ``cats/001.png``,
  ``images[17]`` (npz key and row) or ``digits.npy[17]``; never a path of the importing machine.

Skipped images (``--skip-corrupt``) keep their source position: their shard simply holds fewer
rows, so the shard ranges never depend on which files turned out unreadable. The dataset's
*positions* 0 … count−1 (what :meth:`ImageDataset.take` takes) enumerate the stored rows in index
order; they equal ``index`` when nothing was skipped.

The file's key/value metadata ``rectiflow_images`` holds the import identity hash, the shard
number, its range and the files skipped in it, so a re-run can keep a finished shard without
decoding it.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
KIND = "image-dataset"
METADATA_KEY = b"rectiflow_images"
SourceKind = Literal["folder", "zip", "npz", "npy"]

SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source", pa.string()),
    ]
)


class ImageFormatError(ValueError):
    """An image dataset, its manifest or one of its shards is missing, corrupt or inconsistent."""


class ImageImportError(ValueError):
    """An import cannot run as asked: bad settings, an unusable source, or a destination that
    holds another import."""


class CorruptImageError(ImageImportError):
    """A source image cannot be read or decoded (and ``--skip-corrupt`` was not given)."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class Skipped(BaseModel):
    """A source image that was not imported (``--skip-corrupt``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    name: str
    reason: str


class ShardInfo(BaseModel):
    """A shard as listed in the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    name: str
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    rows: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class SourceInfo(BaseModel):
    """What identifies the source (no machine paths): its kind, how many images it lists and a
    fingerprint of the listing (names and sizes/CRCs, or array key, shape and dtype)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SourceKind
    files: int = Field(ge=1)
    fingerprint: str


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: int = Field(ge=1)
    channels: Literal[1, 3]
    shard_size: int = Field(ge=1)


class Manifest(BaseModel):
    """``_SUCCESS.json`` of an image import (extra fields such as timings are kept but unchecked)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["image-dataset"]
    format_version: Literal[1]
    identity: str
    source: SourceInfo
    source_name: str
    settings: Settings
    count: int = Field(ge=0)
    resolution: int = Field(ge=1)
    channels: Literal[1, 3]
    shape: list[int]
    shards: list[ShardInfo]
    classes: list[str] | None
    skipped: list[Skipped]
    skipped_count: int = Field(ge=0)
