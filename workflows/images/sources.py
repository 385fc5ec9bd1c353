"""Image sources: list what an import will read (names only) and read one shard's images.

Supported sources (SRC may be a local path or any fsspec URI, or a built-in source of
:mod:`workflows.images.builtin` such as ``sklearn:digits``):

- **folder**: every ``.png``, ``.jpg``, ``.jpeg`` file under it (case-insensitive; files and
  folders whose name starts with ``.`` are ignored), in sorted order of their relative path.
  An image directly in SRC has label −1; an image anywhere under ``SRC/NAME/`` has the label
  index of ``NAME`` among the sorted class-folder names.
- **zip** (``.zip``): the same rule over the archive's entries (``__MACOSX/`` is ignored). When
  every image sits under one common top folder (a zipped folder) that folder is treated as the
  root.
- **npz** / **npy**: a uint8 array (N, H, W), (N, H, W, C) or (N, C, H, W) with C ∈ {1, 3, 4}.
  A 4-D array whose last axis is 1, 3 or 4 is read as (N, H, W, C); otherwise, if its second axis
  is, as (N, C, H, W). In an ``.npz`` the images are under key ``images`` (else ``x``) and the
  optional integer labels (N,) under ``labels`` (else ``y``). Float and other non-uint8 arrays
  are refused (no silent rescaling: convert to uint8 first). Arrays are read a shard's rows at a
  time, straight from the file (pickled object arrays are refused, nothing is unpickled).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from workflows.images.builtin import materialized
from workflows.images.format import ImageImportError
from workflows.storage import location

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGE_KEYS, LABEL_KEYS = ("images", "x"), ("labels", "y")


class SourceError(ImageImportError):
    """The source cannot be imported (missing, empty, unsupported layout)."""


class CorruptImage(ValueError):
    """One source image cannot be read or decoded."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class ArrayInfo:
    """Where an array lies in an .npy file (or an .npz member)."""

    member: str | None  # npz member (``images.npy``) or None for a plain .npy
    key: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Source:
    """A listed source: names (and labels) up front, pixels only when a shard is read."""

    kind: str
    uri: str
    name: str
    count: int
    fingerprint: str
    classes: list[str] | None = None
    # folder / zip
    root: str = ""
    names: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    # npz / npy
    images: ArrayInfo | None = None
    label_array: ArrayInfo | None = None
    ignored: int = 0

    @property
    def natural_channels(self) -> int:
        """1 for single-channel arrays, 3 otherwise (the default of ``--channels``)."""
        if self.images is not None and _layout(self.images.shape)[1] == 1:
            return 1
        return 3


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _labelled(relative_names: list[str]) -> tuple[list[str], list[int], list[str] | None]:
    """(sorted names, labels, class names) by the folder rule."""
    names = sorted(relative_names)
    classes = sorted({name.split("/", 1)[0] for name in names if "/" in name})
    lookup = {name: index for index, name in enumerate(classes)}
    labels = [lookup[name.split("/", 1)[0]] if "/" in name else -1 for name in names]
    return names, labels, classes


def _list_folder(src, ignored: list[str]) -> list[tuple[str, int]]:
    found = []
    for path, info in sorted(src.fs.find(src.path, detail=True).items()):
        if info.get("type", "file") != "file":
            continue
        relative = posixpath.relpath(str(path).replace("\\", "/"), src.path)
        if _hidden(relative):
            continue
        if relative.lower().endswith(IMAGE_EXTENSIONS):
            found.append((relative, int(info.get("size") or 0)))
        else:
            ignored.append(relative)
    return found


def _zip_members(archive: zipfile.ZipFile) -> tuple[str, list[tuple[str, int, int]], int]:
    """(root prefix, [(name below the root, crc, size)], ignored count)."""
    members, ignored = [], 0
    for info in archive.infolist():
        if info.is_dir() or info.filename.startswith("__MACOSX/") or _hidden(info.filename):
            continue
        if info.filename.lower().endswith(IMAGE_EXTENSIONS):
            members.append((info.filename, info.CRC, info.file_size))
        else:
            ignored += 1
    root = ""
    tops = {name.split("/", 1)[0] if "/" in name else None for name, _, _ in members}
    if len(tops) == 1 and None not in tops:
        root = f"{tops.pop()}/"
    return root, [(name[len(root) :], crc, size) for name, crc, size in members], ignored


def _read_array_header(handle: BinaryIO, key: str, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise SourceError(
                f"{where}: array {key!r} uses .npy format version {version}; save it with numpy's default format"
            )
    except (ValueError, OSError, EOFError) as error:
        if isinstance(error, SourceError):
            raise
        raise SourceError(f"{where}: array {key!r} is not a readable .npy array ({error})") from None
    if dtype.hasobject:
        raise SourceError(f"{where}: array {key!r} holds Python objects (it would need pickle); refused")
    if fortran and len(shape) > 1:
        raise SourceError(f"{where}: array {key!r} is Fortran-ordered; save np.ascontiguousarray(a) instead")
    return tuple(int(n) for n in shape), dtype, handle.tell()


def _layout(shape: tuple[int, ...]) -> tuple[str, int]:
    """('NHW' | 'NHWC' | 'NCHW', channels) by the documented rule."""
    if len(shape) == 3:
        return "NHW", 1
    if len(shape) == 4 and shape[3] in (1, 3, 4):
        return "NHWC", shape[3]
    if len(shape) == 4 and shape[1] in (1, 3, 4):
        return "NCHW", shape[1]
    raise SourceError(
        f"image array has shape {list(shape)}: expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4"
    )


def _check_arrays(where: str, images: ArrayInfo, labels: ArrayInfo | None) -> None:
    if np.dtype(images.dtype) != np.uint8:
        dtype = np.dtype(images.dtype).name
        kind = "float" if np.dtype(images.dtype).kind == "f" else dtype
        raise SourceError(
            f"{where}: array {images.key!r} has dtype {dtype}; only uint8 pixels (0…255) are imported. "
            f"{kind} arrays are refused rather than guessed at: convert first, e.g. "
            "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for values in [0, 1]"
        )
    try:
        _layout(images.shape)
    except SourceError as error:
        raise SourceError(f"{where}: {error}") from None
    if images.shape[0] == 0 or images.row_bytes == 0:
        raise SourceError(f"{where}: array {images.key!r} holds no images (shape {list(images.shape)})")
    if labels is not None:
        if np.dtype(labels.dtype).kind not in "iu":
            raise SourceError(
                f"{where}: labels {labels.key!r} have dtype {np.dtype(labels.dtype).name}; expected integers"
            )
        if labels.shape != (images.shape[0],):
            raise SourceError(
                f"{where}: labels {labels.key!r} have shape {list(labels.shape)}; expected ({images.shape[0]},) "
                f"to match {images.key!r}"
            )


def _npz_arrays(archive: zipfile.ZipFile, where: str) -> tuple[ArrayInfo, ArrayInfo | None]:
    members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
    image_key = next((key for key in IMAGE_KEYS if key in members), None)
    if image_key is None:
        raise SourceError(f"{where}: no image array under key 'images' or 'x' (keys: {sorted(members)})")
    label_key = next((key for key in LABEL_KEYS if key in members), None)
    found = []
    for key in [image_key] + ([label_key] if label_key else []):
        with archive.open(members[key]) as handle:
            shape, dtype, offset = _read_array_header(handle, key, where)
        found.append(ArrayInfo(members[key], key, shape, dtype.str, offset))
    return found[0], (found[1] if len(found) > 1 else None)


@contextmanager
def listed(source: str) -> Iterator[Source]:
    """The listing of ``source`` — a path or URI, or a built-in source materialised for as long as
    the context lasts (:mod:`workflows.images.builtin`)."""
    with materialized(source) as path:
        yield list_source(path)


def list_source(uri: str) -> Source:
    """List a source: names, labels and array headers; no pixel is read."""
    src = location(uri)
    if not src.exists():
        raise SourceError(f"source {uri} does not exist")
    name = src.name
    lowered = name.lower()
    if src.fs.isdir(src.path):
        ignored: list[str] = []
        found = _list_folder(src, ignored)
        if not found:
            raise SourceError(f"source folder {uri} holds no PNG or JPEG images ({', '.join(IMAGE_EXTENSIONS)})")
        names, labels, classes = _labelled([relative for relative, _ in found])
        sizes = dict(found)
        fingerprint = _fingerprint([[n, sizes[n]] for n in names])
        return Source(
            "folder", src.uri, name, len(names), fingerprint, classes, "", names, labels, ignored=len(ignored)
        )
    if lowered.endswith(".zip"):
        try:
            with src.fs.open(src.path, "rb") as handle, zipfile.ZipFile(handle) as archive:
                root, members, ignored_count = _zip_members(archive)
        except zipfile.BadZipFile as error:
            raise SourceError(f"source {uri} is not a readable zip archive ({error})") from None
        if not members:
            raise SourceError(f"zip archive {uri} holds no PNG or JPEG images ({', '.join(IMAGE_EXTENSIONS)})")
        names, labels, classes = _labelled([member for member, _, _ in members])
        crcs = {member: [crc, size] for member, crc, size in members}
        fingerprint = _fingerprint([[n, *crcs[n]] for n in names])
        return Source(
            "zip", src.uri, name, len(names), fingerprint, classes, root, names, labels, ignored=ignored_count
        )
    if lowered.endswith(".npz"):
        try:
            with src.fs.open(src.path, "rb") as handle, zipfile.ZipFile(handle) as archive:
                images, labels_info = _npz_arrays(archive, uri)
        except zipfile.BadZipFile as error:
            raise SourceError(f"source {uri} is not a readable .npz archive ({error})") from None
        kind = "npz"
    elif lowered.endswith(".npy"):
        with src.fs.open(src.path, "rb") as handle:
            shape, dtype, offset = _read_array_header(handle, name, uri)
        images, labels_info, kind = ArrayInfo(None, name, shape, dtype.str, offset), None, "npy"
    else:
        raise SourceError(
            f"source {uri} is neither a folder nor a .zip, .npz or .npy file; "
            "give a folder of PNG/JPEG images, a zip of them, or a uint8 array"
        )
    _check_arrays(uri, images, labels_info)
    described: dict[str, Any] = {"images": [images.key, list(images.shape), images.dtype], "size": src.size()}
    if labels_info is not None:
        described["labels"] = [labels_info.key, list(labels_info.shape), labels_info.dtype]
    return Source(
        kind, src.uri, name, images.shape[0], _fingerprint(described), None, images=images, label_array=labels_info
    )


# -- reading one shard -------------------------------------------------------------------------


def _slice(handle: BinaryIO, info: ArrayInfo, start: int, stop: int) -> np.ndarray:
    handle.seek(info.offset + start * info.row_bytes)
    data = handle.read((stop - start) * info.row_bytes)
    if len(data) != (stop - start) * info.row_bytes:
        raise SourceError(f"array {info.key!r} is truncated: rows [{start}, {stop}) lie past the end of the file")
    return np.frombuffer(data, dtype=np.dtype(info.dtype)).reshape(stop - start, *info.shape[1:])


def _array_image(row: np.ndarray, layout: str) -> Image.Image:
    if layout == "NCHW":
        row = np.moveaxis(row, 0, -1)
    if row.ndim == 3 and row.shape[-1] == 1:
        row = row[..., 0]
    mode = {2: "L"}.get(row.ndim) or {3: "RGB", 4: "RGBA"}[row.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(row), mode=mode)


def _decode_file(data: bytes, name: str) -> Image.Image:
    if not data:
        raise CorruptImage(name, "the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise CorruptImage(name, f"not a decodable image: {error}") from None
    return image


def read_images(source: Source, start: int, stop: int) -> Iterator[tuple[int, str, int, Image.Image | CorruptImage]]:
    """(position, source name, label, image or the :class:`CorruptImage` why not) for the source
    positions [start, stop), in order. Opens the source once for the whole range."""
    src = location(source.uri)
    if source.kind == "folder":
        for position in range(start, stop):
            name = source.names[position]
            try:
                with src.fs.open(posixpath.join(src.path, name), "rb") as handle:
                    data = handle.read()
            except OSError as error:
                yield position, name, source.labels[position], CorruptImage(name, f"unreadable: {error}")
                continue
            try:
                image: Image.Image | CorruptImage = _decode_file(data, name)
            except CorruptImage as error:
                image = error
            yield position, name, source.labels[position], image
    elif source.kind == "zip":
        with src.fs.open(src.path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            for position in range(start, stop):
                name = source.names[position]
                try:
                    data = archive.read(source.root + name)
                except (OSError, zipfile.BadZipFile, KeyError, EOFError) as error:
                    yield position, name, source.labels[position], CorruptImage(name, f"unreadable zip entry: {error}")
                    continue
                try:
                    image = _decode_file(data, name)
                except CorruptImage as error:
                    image = error
                yield position, name, source.labels[position], image
    else:
        info = source.images
        assert info is not None
        layout, _ = _layout(info.shape)
        with src.fs.open(src.path, "rb") as handle:
            if info.member is not None:
                archive = zipfile.ZipFile(handle)
                with archive.open(info.member) as member:
                    pixels = _slice(member, info, start, stop)
                labels = None
                if source.label_array is not None:
                    with archive.open(source.label_array.member) as member:
                        labels = _slice(member, source.label_array, start, stop).astype(np.int64)
            else:
                pixels = _slice(handle, info, start, stop)
                labels = None
        prefix = info.key if info.member is not None else source.name
        for offset, position in enumerate(range(start, stop)):
            label = int(labels[offset]) if labels is not None else -1
            yield position, f"{prefix}[{position}]", label, _array_image(pixels[offset], layout)
