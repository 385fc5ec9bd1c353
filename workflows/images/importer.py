"""``rectiflow data import``: turn a folder, zip or uint8 array of images into Parquet shards.

Each image is oriented by its EXIF tag, converted to ``L`` (``--channels 1``) or ``RGB``
(``--channels 3``; alpha is discarded, 16-bit grey is scaled by 1/256), resized so that its shorter
side is R (bicubic, which Pillow antialiases when shrinking; an image whose shorter side already
is R is not resampled), center-cropped to R×R (the extra column/row of an odd margin goes to the
right/bottom) and stored as PNG. See :mod:`workflows.images.format` for the shard layout and
:mod:`workflows.images.sources` for what a source may be.

Exactly-once and resumable: shard ``s`` always covers source positions [s·S, (s+1)·S), its bytes
are a pure function of the source and the settings, it becomes visible only complete
(:meth:`Location.write_bytes`), and ``_SUCCESS.json`` is written last. A re-run keeps every shard
already written for the same source and settings and writes only the missing ones; a destination
holding a finished import of another source or other settings is refused. With Ray initialised,
shards are encoded by Ray tasks (one logical CPU left free); otherwise one after another here;
the bytes are the same either way.

Unreadable images stop the import with an error naming the file (no ``_SUCCESS.json``), unless
``skip_corrupt``: then they are left out, their source positions stay unused (the shard holds
fewer rows) and the manifest lists them with the reason. ``skip_corrupt`` only governs shards
encoded by this run: shards kept from an earlier run keep what they skipped.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from workflows.images.format import (
    FORMAT_VERSION,
    KIND,
    METADATA_KEY,
    SCHEMA,
    CorruptImageError,
    ImageImportError,
    Settings,
    SourceInfo,
    shard_name,
)
from workflows.images.sources import CorruptImage, Source, list_source, read_images
from workflows.shards import parquet_bytes, sha256, shard_count, shard_range
from workflows.stage import SUCCESS_FILE, code_version, content_hash, finished_manifest, utc_now, write_manifest
from workflows.storage import Location, location

PNG_COMPRESS_LEVEL = 6
Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(f"rectiflow data import: {line}", file=sys.stderr, flush=True)


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


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# -- one shard ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """What encoding one shard needs besides the (shared) listed source."""

    index: int
    start: int
    stop: int
    resolution: int
    channels: int
    identity: str
    skip_corrupt: bool
    destination: str


def encode_shard(source: Source, job: ShardJob) -> tuple[bytes, int, list[dict[str, Any]]]:
    """(Parquet bytes, rows, skipped) of one shard; deterministic. Raises
    :class:`CorruptImageError` on an unreadable image unless ``job.skip_corrupt``."""
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    skipped: list[dict[str, Any]] = []
    for position, name, label, image in read_images(source, job.start, job.stop):
        if not isinstance(image, CorruptImage):
            try:
                image = square(image, job.resolution, job.channels)
            except (OSError, ValueError) as error:
                image = CorruptImage(name, f"cannot be converted: {error}")
        if isinstance(image, CorruptImage):
            if not job.skip_corrupt:
                raise CorruptImageError(
                    f"source {source.uri}: image {name} is unreadable ({image.reason}); fix or remove it, "
                    "or pass --skip-corrupt to leave such images out"
                )
            skipped.append({"index": position, "name": name, "reason": image.reason})
            continue
        columns["index"].append(position)
        columns["image"].append(png_bytes(image))
        columns["label"].append(label)
        columns["height"].append(job.resolution)
        columns["width"].append(job.resolution)
        columns["source"].append(name)
    info = {
        "format_version": FORMAT_VERSION,
        "identity": job.identity,
        "shard": job.index,
        "start": job.start,
        "stop": job.stop,
        "skipped": skipped,
    }
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(info, sort_keys=True).encode()})
    table = pa.Table.from_arrays([pa.array(columns[field.name], type=field.type) for field in SCHEMA], schema=schema)
    return parquet_bytes(table, ["index", "label"]), table.num_rows, skipped


def _entry(job: ShardJob, data: bytes, rows: int, skipped: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": job.index,
        "name": shard_name(job.index),
        "start": job.start,
        "stop": job.stop,
        "rows": rows,
        "sha256": sha256(data),
        "bytes": len(data),
        "skipped": skipped,
    }


def write_shard(source: Source, job: ShardJob) -> dict[str, Any]:
    """Encode and write one shard (atomically); its manifest entry (with its skipped files) or
    ``{"error": message}`` for an unreadable image."""
    try:
        data, rows, skipped = encode_shard(source, job)
    except CorruptImageError as error:
        return {"index": job.index, "error": str(error)}
    location(job.destination).join(shard_name(job.index)).write_bytes(data)
    return _entry(job, data, rows, skipped)


def existing_shard(destination: Location, job: ShardJob) -> dict[str, Any] | None:
    """The entry of shard ``job.index`` when the destination already holds it for this import
    (same identity and range); None when it must be (re)written."""
    try:
        data = destination.join(shard_name(job.index)).read_bytes()
        footer = pq.read_metadata(pa.BufferReader(data))
        info = json.loads(footer.metadata[METADATA_KEY])
    except (FileNotFoundError, pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError):
        return None
    expected = (FORMAT_VERSION, job.identity, job.index, job.start, job.stop)
    if (info.get("format_version"), info.get("identity"), info.get("shard"), info.get("start"), info.get("stop")) != expected:
        return None
    skipped = info.get("skipped") or []
    if footer.num_rows + len(skipped) != job.stop - job.start:
        return None
    return _entry(job, data, footer.num_rows, skipped)


# -- the import --------------------------------------------------------------------------------


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ImageImportError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _complete(destination: Location, manifest: dict[str, Any]) -> bool:
    present = set(destination.list_names())
    for shard in manifest.get("shards", []):
        if shard.get("name") not in present or destination.join(shard["name"]).size() != shard.get("bytes"):
            return False
    return True


def import_images(
    src: str,
    dst: str,
    *,
    resolution: int,
    channels: int | None = None,
    shard_size: int = 1000,
    skip_corrupt: bool = False,
    parallel: bool | None = None,
    progress: Progress | None = _stderr,
) -> dict[str, Any]:
    """Import ``src`` into ``dst`` (see the module doc); returns the manifest.

    ``channels`` None: 1 for single-channel arrays, 3 otherwise. ``parallel`` None: Ray tasks when
    Ray is initialised. ``progress``: called with one line per finished shard (None: silent)."""
    started, clock = utc_now(), time.perf_counter()
    say = progress or (lambda line: None)
    resolution = _positive(resolution, "resolution")
    shard_size = _positive(shard_size, "shard size")
    if channels is not None and channels not in (1, 3):
        raise ImageImportError(f"channels must be 1 or 3, got {channels!r}")
    source = list_source(src)
    channels = channels if channels is not None else source.natural_channels
    settings = Settings(resolution=resolution, channels=channels, shard_size=shard_size).model_dump()
    source_info = SourceInfo(kind=source.kind, files=source.count, fingerprint=source.fingerprint).model_dump()
    identity = content_hash({"format_version": FORMAT_VERSION, "source": source_info, "settings": settings})
    destination = location(dst)

    try:
        finished = finished_manifest(
            destination, KIND, "image import", {"source": source_info, "settings": settings}, ImageImportError
        )
    except ImageImportError:
        raise
    except ValueError as error:  # an unreadable _SUCCESS.json
        raise ImageImportError(f"output {destination.uri} holds an unreadable manifest: {error}") from None
    if finished is not None:
        if _complete(destination, finished):
            say(f"{destination.uri} already holds this import ({finished.get('count')} images); nothing to do")
            return finished
        say(f"{destination.uri} is finished but misses shards; unmarking it and writing them again")
        destination.join(SUCCESS_FILE).delete()

    total = shard_count(source.count, shard_size)
    jobs = [
        ShardJob(index, *shard_range(index, shard_size, source.count), resolution, channels, identity,
                 skip_corrupt, destination.uri)
        for index in range(total)
    ]
    entries: dict[int, dict[str, Any]] = {}
    present = set(destination.list_names())
    for job in jobs:
        if shard_name(job.index) in present:
            entry = existing_shard(destination, job)
            if entry is not None:
                entries[job.index] = entry
    missing = [job for job in jobs if job.index not in entries]
    ignored = f", {source.ignored} non-image files ignored" if source.ignored else ""
    say(f"{source.kind} {source.name}: {source.count} images in {total} shards of {shard_size}{ignored}; "
        f"{len(entries)} already written, {len(missing)} to write")

    if parallel is None:
        ray = sys.modules.get("ray")
        parallel = bool(ray is not None and ray.is_initialized())
    encode_start, images_done = time.perf_counter(), 0

    def finished_one(entry: dict[str, Any]) -> None:
        nonlocal images_done
        if "error" in entry:
            raise CorruptImageError(entry["error"])
        entries[entry["index"]] = entry
        images_done += entry["stop"] - entry["start"]
        rate = images_done / max(time.perf_counter() - encode_start, 1e-9)
        say(f"{len(entries)}/{total} shards done ({rate:.1f} images/s)")

    if parallel and missing:
        _run_with_ray(source, missing, finished_one)
    else:
        for job in missing:
            finished_one(write_shard(source, job))

    shards = [entries[index] for index in range(total)]
    skipped = sorted((item for entry in shards for item in entry["skipped"]), key=lambda item: item["index"])
    manifest = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "source": source_info,
        "source_name": source.name,
        "settings": settings,
        "count": sum(entry["rows"] for entry in shards),
        "resolution": resolution,
        "channels": channels,
        "shape": [channels, resolution, resolution],
        "shards": [{key: value for key, value in entry.items() if key != "skipped"} for entry in shards],
        "classes": source.classes,
        "skipped": skipped,
        "skipped_count": len(skipped),
        "bytes": sum(entry["bytes"] for entry in shards),
        "code": code_version(),
        "started_at": started,
        "finished_at": utc_now(),
        "wall_seconds": round(time.perf_counter() - clock, 3),
    }
    write_manifest(destination, manifest)
    say(f"done: {manifest['count']} images, {len(skipped)} skipped, {total} shards in {destination.uri}")
    return manifest


def _run_with_ray(source: Source, jobs: list[ShardJob], finished_one: Callable[[dict[str, Any]], None]) -> None:
    """Encode ``jobs`` as Ray tasks, at most (cluster CPUs − 1) at a time, reporting in order of
    completion; stops submitting at the first unreadable image."""
    import ray

    task = ray.remote(num_cpus=1)(write_shard)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    shared = ray.put(source)
    pending: list[Any] = []
    queue = list(jobs)
    try:
        while queue or pending:
            while queue and len(pending) < slots:
                pending.append(task.remote(shared, queue.pop(0)))
            done, pending = ray.wait(pending, num_returns=1)
            finished_one(ray.get(done[0]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
