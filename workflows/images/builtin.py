"""Image sources that ship inside installed packages, for demos that need no download.

``sklearn:digits`` is scikit-learn's copy of the UCI handwritten digits: 1,797 real 8×8 grey
images with values 0…16 and labels 0…9. It is written as a uint8 array (v · 255 / 16, rounded)
with its labels to an ``.npz`` that an import (:func:`workflows.images.import_images`) resizes like any
other source.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BUILTIN = ("sklearn:digits",)


def digits_array() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (uint8 (1797, 8, 8), int64 labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


@contextmanager
def materialized(source: str) -> Iterator[str]:
    """A path the importer reads for ``source``: a temporary ``.npz`` for a built-in source,
    ``source`` itself otherwise."""
    if source not in BUILTIN:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="rectiflow-builtin-") as folder:
        images, labels = digits_array()
        path = Path(folder) / "digits.npz"
        np.savez(path, images=images, labels=labels)
        yield str(path)
