"""``rectiflow data import``: turn a folder, zip or uint8 array of images into Parquet shards.

Each image is oriented by its EXIF tag, converted to ``L`` (1 channel) or ``RGB`` (3 channels;
alpha is discarded, 16-bit grey is scaled by 1/256), resized so that its shorter side is R
(bicubic, which Pillow antialiases when shrinking; an image whose shorter side already is R is not
resampled), center-cropped to R×R (the extra column/row of an odd margin goes to the
right/bottom) and stored as PNG or raw uint8 pixels. See :mod:`workflows.images.format` for the
shard layout, :mod:`workflows.images.sources` for what a source may be, and
:mod:`workflows.stages.import_images` for the stage that runs an import (resumable, parallel).

This module holds what one shard needs: :func:`encode_shard` makes its bytes, a pure function of
the listed source, the shard's range and the settings; :func:`kept_shard` recognises from its
footer a shard an earlier run of the same import wrote. :func:`import_images` is the Python entry
point (and what ``rectiflow data import`` calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from pydantic import ValidationError

from workflows.images.format import (
    FOOTER_KIND,
    CorruptImageError,
    Encoding,
    ImageImportError,
    encode_image,
    schema,
)
from workflows.images.sources import CorruptImage, Source, listed, read_images
from workflows.manifest import Manifest
from workflows.settings import ImportConfig, format_errors
from workflows.shard_format import ShardEntry, ShardError, footer_info, parquet_bytes, sha256, shard_name, with_metadata
from workflows.storage import location

# -- one image ---------------------------------------------------------------------------------


def square(image: Image.Image, resolution: int, channels: int) -> Image.Image:
    """``image`` as an 8-bit ``L``/``RGB`` image of resolution × resolution (see the module doc)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    short = min(width, height)
    if short != resolution:
        size = (
            max(resolution, round(width * resolution / short)),
            max(resolution, round(height * resolution / short)),
        )
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
        width, height = size
    left, top = (width - resolution) // 2, (height - resolution) // 2
    if (width, height) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


# -- one shard ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """What encoding one shard needs besides the listed source: its number and source positions
    [start, stop), the image shape (C, R, R), the encoding, the import identity
    (:func:`workflows.images.format.import_identity`) and whether unreadable images are skipped."""

    index: int
    start: int
    stop: int
    shape: tuple[int, int, int]
    encoding: Encoding
    identity: str
    skip_corrupt: bool

    def footer(self, skipped: list[dict[str, Any]]) -> dict[str, Any]:
        """The shard's ``rectiflow`` footer metadata."""
        return {
            "kind": FOOTER_KIND,
            "identity": self.identity,
            "shard": self.index,
            "start": self.start,
            "stop": self.stop,
            "skipped": skipped,
            "encoding": self.encoding,
        }

    def entry(self, data: bytes, rows: int) -> ShardEntry:
        return ShardEntry(self.index, shard_name(self.index), self.start, self.stop, rows, sha256(data), len(data))


def encode_shard(source: Source, shard: ShardPlan) -> tuple[bytes, ShardEntry, list[dict[str, Any]]]:
    """(Parquet bytes, manifest entry, skipped images) of one shard; deterministic. Raises
    :class:`CorruptImageError` naming the file on an unreadable image unless ``shard.skip_corrupt``."""
    channels, resolution, _ = shard.shape
    fields = schema(shard.encoding, shard.shape)
    columns: dict[str, list[Any]] = {name: [] for name in fields.names}
    skipped: list[dict[str, Any]] = []
    for position, name, label, image in read_images(source, shard.start, shard.stop):
        if not isinstance(image, CorruptImage):
            try:
                image = square(image, resolution, channels)
            except (OSError, ValueError) as error:
                image = CorruptImage(name, f"cannot be converted: {error}")
        if isinstance(image, CorruptImage):
            if not shard.skip_corrupt:
                raise CorruptImageError(
                    f"source {source.uri}: image {name} is unreadable ({image.reason}); fix or remove it, "
                    "or pass --skip-corrupt to leave such images out"
                )
            skipped.append({"index": position, "name": name, "reason": image.reason})
            continue
        columns["index"].append(position)
        columns["image"].append(encode_image(image, shard.encoding))
        columns["label"].append(label)
        columns["height"].append(resolution)
        columns["width"].append(resolution)
        columns["source"].append(name)
    table = pa.Table.from_arrays([pa.array(columns[field.name], type=field.type) for field in fields], schema=fields)
    data = parquet_bytes(with_metadata(table, shard.footer(skipped)), ["index", "label"])
    return data, shard.entry(data, table.num_rows), skipped


def kept_shard(data: bytes, shard: ShardPlan, where: str) -> tuple[ShardEntry, list[dict[str, Any]]] | None:
    """(entry, skipped images) when ``data`` — the file found at ``where`` — is this shard as this
    import writes it, judged from its footer: the same identity, range and encoding, a row for
    every position not skipped, and skips only when this import skips. None when it must be
    written again."""
    try:
        footer, info = footer_info(data, where)
    except ShardError:
        return None
    skipped = info.get("skipped")
    written = {key: value for key, value in info.items() if key != "format_version"}
    if not isinstance(skipped, list) or written != shard.footer(skipped):
        return None
    if footer.num_rows + len(skipped) != shard.stop - shard.start or (skipped and not shard.skip_corrupt):
        return None
    return shard.entry(data, footer.num_rows), skipped


# -- the Python entry point --------------------------------------------------------------------


def import_images(
    src: str,
    dst: str,
    *,
    resolution: int,
    channels: int | None = None,
    shard_size: int = 1000,
    skip_corrupt: bool = False,
    encoding: Encoding = "png",
    parallel: bool | None = None,
) -> Manifest:
    """Import ``src`` (a folder, zip, .npz/.npy or ``sklearn:digits``) into ``dst`` as the
    ``import`` stage does (see :mod:`workflows.stages.import_images`); returns its manifest.

    ``channels`` None: the source's natural channels (1 for single-channel arrays, 3 otherwise).
    ``parallel`` None: an actor pool when Ray is initialised, one shard after another otherwise."""
    from workflows.stages.import_images import import_listed  # the stage imports this module

    with listed(src) as source:
        shape = [source.natural_channels if channels is None else channels, resolution, resolution]
        try:
            config = ImportConfig(
                source=src, shape=shape, shard_size=shard_size, encoding=encoding, skip_corrupt=skip_corrupt
            )
        except ValidationError as error:
            raise ImageImportError(f"invalid import settings: {'; '.join(format_errors(error))}") from None
        return import_listed(config, source, location(dst), parallel)
