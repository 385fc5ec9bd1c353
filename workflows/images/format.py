"""The image dataset format shared by the importer and the reader.

A dataset is the output folder of an ``import`` stage (any fsspec URI): Parquet shards
``shard-000000.parquet`` … in the vocabulary of :mod:`workflows.shard_format` and, written last,
``_SUCCESS.json`` (the stage :class:`~workflows.manifest.Manifest`, kind ``import``, whose
``details`` are an :class:`ImportDetails`). Shard ``s`` covers the *source positions*
[s·S, min((s+1)·S, N)) of the N images listed from the source in sorted order (S = shard size).

Columns (one row per image, in increasing ``index``):

- ``index`` int64 — the image's source position (its rank in the sorted source listing);
- ``image`` — with encoding ``png``: binary PNG bytes, 8-bit ``L`` (1 channel) or ``RGB``
  (3 channels), R×R; with encoding ``raw``: fixed-size binary of C·R·R bytes, the uint8 pixels in
  (C, R, R) order (Parquet ``FIXED_LEN_BYTE_ARRAY``: no per-value overhead, decoded by
  ``np.frombuffer`` without a copy);
- ``label`` int64 — the class index (sorted class-folder name), the array label, or −1;
- ``height``, ``width`` int32 — the stored image size (always R, R);
- ``source`` string — where the image came from, relative to the source: ``cats/001.png``,
  ``images[17]`` (npz key and row) or ``digits.npy[17]``; never a path of the importing machine.

Skipped images (``--skip-corrupt``) keep their source position: their shard simply holds fewer
rows, so the shard ranges never depend on which files turned out unreadable. The dataset's
*positions* 0 … count−1 (what :meth:`ImageDataset.take` takes) enumerate the stored rows in index
order; they equal ``index`` when nothing was skipped.

The footer's ``rectiflow`` metadata (:func:`workflows.shard_format.with_metadata`) holds
``{"kind": "images", "identity", "shard", "start", "stop", "skipped", "encoding"}``: the import
identity (:func:`import_identity`), the shard's range and the files skipped in it, so a re-run
can keep a finished shard from its footer without decoding it.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workflows.settings import content_hash
from workflows.shard_format import ShardEntry, ShardError, check_layout

FOOTER_KIND = "images"
"""The ``kind`` in an image shard's footer metadata."""
STAGE_KIND = "import"
"""The kind of the stage whose manifest describes an image dataset."""
PNG_COMPRESS_LEVEL = 6
Encoding = Literal["png", "raw"]
SourceKind = Literal["folder", "zip", "npz", "npy"]


class ImageFormatError(ShardError):
    """An image dataset, its manifest or one of its shards is missing, corrupt or inconsistent."""


class ImageImportError(ValueError):
    """An import cannot run as asked: bad settings, an unusable source, or a destination that
    holds another import."""


class CorruptImageError(ImageImportError):
    """A source image cannot be read or decoded (and ``--skip-corrupt`` was not given)."""


def schema(encoding: Encoding, shape: tuple[int, int, int] | list[int]) -> pa.Schema:
    """The columns of a shard of images of ``shape`` (C, R, R) stored as ``encoding``."""
    image = pa.binary() if encoding == "png" else pa.binary(int(np.prod(shape)))
    return pa.schema(
        [
            ("index", pa.int64()),
            ("image", image),
            ("label", pa.int64()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("source", pa.string()),
        ]
    )


def encode_image(image: Image.Image, encoding: Encoding) -> bytes:
    """An 8-bit ``L`` / ``RGB`` image as stored: PNG bytes, or its uint8 pixels in (C, R, R) order."""
    if encoding == "raw":
        pixels = np.asarray(image, dtype=np.uint8)
        return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)).tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_images(
    column: pa.ChunkedArray,
    encoding: Encoding,
    shape: tuple[int, int, int],
    index: np.ndarray,
    source: str,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 (n, C, R, R) pixels of a shard's ``image`` column (its schema already checked), written
    into ``out`` when given (a window's buffer: no copy of the shard's own), else a new array (raw
    pixels: a read-only view of the column); :class:`ImageFormatError` naming ``source`` and the
    image's index when one does not decode."""
    if column.null_count:
        raise ImageFormatError(f"shard {source}: {column.null_count} images are null")
    channels, height, width = shape
    if out is not None and out.shape != (len(column), *shape):
        raise ValueError(f"shard {source}: {len(column)} images of {shape} do not fit a buffer of {out.shape}")
    if encoding == "raw":
        array = column.combine_chunks()
        size = channels * height * width
        pixels = np.frombuffer(array.buffers()[1], dtype=np.uint8, count=len(array) * size, offset=array.offset * size)
        pixels = pixels.reshape(len(array), channels, height, width)
        if out is None:
            return pixels
        np.copyto(out, pixels)
        return out
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(column), channels, height, width), dtype=np.uint8) if out is None else out
    for row, blob in enumerate(column.to_pylist()):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                image.load()
                if image.format != "PNG" or image.mode != mode or image.size != (width, height):
                    raise ImageFormatError(
                        f"shard {source}: image of index {index[row]} is a {image.format} {image.mode} "
                        f"{image.size[0]}x{image.size[1]} image, expected PNG {mode} {width}x{height}"
                    )
                pixels = np.asarray(image)
        except (OSError, SyntaxError, ValueError) as error:
            if isinstance(error, ImageFormatError):
                raise
            raise ImageFormatError(f"shard {source}: image of index {index[row]} does not decode ({error})") from None
        images[row] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return images


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Skipped(_Record):
    """A source image that was not imported (``--skip-corrupt``)."""

    index: int = Field(ge=0)
    name: str
    reason: str


class SourceInfo(_Record):
    """What identifies the source (no machine paths): its kind, how many images it lists and a
    fingerprint of the listing (names and sizes/CRCs, or array key, shape, dtype and file size)."""

    kind: SourceKind
    files: int = Field(ge=1)
    fingerprint: str


def import_identity(source: SourceInfo, shape: list[int], shard_size: int, encoding: Encoding) -> str:
    """What decides the bytes of every shard of an import (the footer's ``identity``): the listed
    source's content and the settings, not how the source was named."""
    return content_hash(
        {"source": source.model_dump(), "shape": list(shape), "shard_size": shard_size, "encoding": encoding}
    )


class ImportDetails(_Record):
    """The ``details`` of an import stage's manifest: the dataset a reader opens."""

    source: SourceInfo
    source_name: str
    count: int = Field(ge=0)
    shape: list[int]
    channels: Literal[1, 3]
    resolution: int = Field(ge=1)
    encoding: Encoding
    shard_size: int = Field(ge=1)
    shards: list[ShardEntry]
    classes: list[str] | None
    skipped: list[Skipped]
    skipped_count: int = Field(ge=0)
    bytes: int = Field(ge=0)
    shards_written: int = Field(ge=0)
    """Shards this run encoded (the others were kept from an earlier, interrupted run)."""

    @model_validator(mode="after")
    def _consistent(self) -> ImportDetails:
        problems = []
        if self.shape != [self.channels, self.resolution, self.resolution]:
            problems.append(
                f"shape {self.shape} disagrees with resolution {self.resolution} and channels {self.channels}"
            )
        if sum(entry.rows for entry in self.shards) != self.count:
            problems.append(f"count {self.count} is not the sum of the shards' rows")
        if self.skipped_count != len(self.skipped) or self.count + self.skipped_count != self.source.files:
            problems.append(
                f"count {self.count} + skipped {self.skipped_count} is not the {self.source.files} source images"
            )
        if sum(entry.bytes for entry in self.shards) != self.bytes:
            problems.append(f"bytes {self.bytes} is not the sum of the shards' bytes")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def parse(cls, details: object, source: str) -> ImportDetails:
        """The details of the manifest ``source``, validated (fields, shard layout, counts);
        :class:`ImageFormatError` naming ``source`` and the fields otherwise."""
        try:
            parsed = cls.model_validate(details)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, ('details', *item['loc'])))}: {item['msg'].removeprefix('Value error, ')}"
                for item in error.errors()
            )
            raise ImageFormatError(f"{source} is not a consistent image import: {problems}") from None
        try:
            check_layout(parsed.shards, parsed.source.files, parsed.shard_size, source)
        except ShardError as error:
            raise ImageFormatError(str(error)) from None
        return parsed
