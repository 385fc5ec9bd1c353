"""Image datasets as Parquet shards of PNGs on any fsspec URI.

- :func:`import_images` (``rectiflow data import``) turns a folder, zip or uint8 array of images
  into shards ``part-00000.parquet`` … plus ``_SUCCESS.json``;
- :class:`ImageDataset` reads them back, verified, with random access;
- :func:`to_unit_interval`, :func:`flip`, :func:`flip_mask` prepare pixels for training.

The format is described in :mod:`workflows.images.format`.
"""

from workflows.images.dataset import ImageDataset, flip, flip_mask, to_unit_interval
from workflows.images.format import CorruptImageError, ImageFormatError, ImageImportError
from workflows.images.importer import import_images

__all__ = [
    "CorruptImageError",
    "ImageDataset",
    "ImageFormatError",
    "ImageImportError",
    "flip",
    "flip_mask",
    "import_images",
    "to_unit_interval",
]
