"""Image datasets as Parquet shards of PNGs or raw uint8 pixels on any fsspec URI.

- :func:`import_images` (``rectiflow data import``, the pipeline's ``import-…`` stages) turns a
  folder, zip, uint8 array or ``sklearn:digits`` into shards ``shard-000000.parquet`` … plus the
  stage manifest ``_SUCCESS.json``;
- :class:`ImageDataset` reads them back, verified, with random access; :func:`decode_shard`
  decodes one shard's verified bytes (:meth:`ImageDataset.shard_bytes`) wherever a stream needs;
- :func:`to_unit_interval`, :func:`flip`, :func:`flip_mask` prepare pixels for training.

The format is described in :mod:`workflows.images.format`.
"""

from workflows.images.dataset import ImageDataset, decode_shard, flip, flip_mask, to_unit_interval
from workflows.images.format import CorruptImageError, ImageFormatError, ImageImportError
from workflows.images.importer import import_images

__all__ = [
    "CorruptImageError",
    "ImageDataset",
    "ImageFormatError",
    "ImageImportError",
    "decode_shard",
    "flip",
    "flip_mask",
    "import_images",
    "to_unit_interval",
]
