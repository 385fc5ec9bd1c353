"""The ``import`` stage: an image source as Parquet shards (format: :mod:`workflows.images.format`).

``run(config: ImportConfig, inputs={}, output) → Manifest`` is a pipeline's ``import-pi0`` /
``import-pi1`` stage, and what ``rectiflow data import`` and :func:`workflows.images.import_images`
run. The manifest's ``details`` describe the dataset (:class:`~workflows.images.format.ImportDetails`).

- **Exactly once, resumable.** Shard ``s`` covers source positions [s·S, (s+1)·S); its bytes are a
  pure function of the listed source, its range and the settings
  (:func:`~workflows.images.importer.encode_shard`); it becomes visible only complete, and
  ``_SUCCESS.json`` is written last. Every shard index goes to an encoder, which keeps a shard an
  earlier run of the same import wrote (recognised from its footer,
  :func:`~workflows.images.importer.kept_shard`) and writes the others. The driver lists names
  and gathers the small per-shard reports; it reads no shard.
- **Parallel or not, the same bytes.** With Ray initialised the encoders are an actor pool
  (:func:`workflows.actor_pool.run_on_actors`, one CPU each, cluster CPUs − 1 of them); otherwise
  one encoder works here, shard after shard. A built-in source is materialised again by each
  encoder (the driver's temporary file may be on another machine).
- **Refusals.** A destination holding a finished import of other settings is refused by
  :func:`workflows.stage.run_stage`, naming the differences; one holding a finished import of the
  same settings but another source content (the listing's fingerprint differs: files added,
  removed or changed) is refused here; both with :class:`ImageImportError`. So is an unfinished
  destination holding shards beyond this import's. A finished destination missing shards (deleted
  since) is unmarked and completed.
- **Unreadable images** stop the import with :class:`CorruptImageError` naming the file (no
  ``_SUCCESS.json``), unless ``skip_corrupt``: then they are left out, their source positions stay
  unused (the shard holds fewer rows) and the manifest lists them with the reason.

Progress goes to the ``rectiflow.images`` logger at INFO (shards and images done, images/s, at
most every few seconds and at the end) and to ``_PROGRESS.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray

from workflows.actor_pool import ItemWorker, run_on_actors
from workflows.images.builtin import BUILTIN
from workflows.images.format import (
    STAGE_KIND,
    CorruptImageError,
    ImageImportError,
    ImportDetails,
    SourceInfo,
    import_identity,
)
from workflows.images.importer import ShardPlan, encode_shard, kept_shard
from workflows.images.sources import Source, listed
from workflows.manifest import SUCCESS_FILE, Manifest, describe_differences
from workflows.settings import ImportConfig
from workflows.shard_format import ShardEntry, present_shards, shard_count, shard_name, shard_range
from workflows.stage import StageContext, run_stage
from workflows.storage import Location

logger = logging.getLogger("rectiflow.images")
_LOG_INTERVAL_S = 5.0


@dataclass(frozen=True)
class ImportJob:
    """What every encoder gets once: the settings, the listed source, the import identity and
    the output folder."""

    config: ImportConfig
    source: Source
    identity: str
    output: Location

    def shard(self, index: int) -> ShardPlan:
        channels, resolution, _ = self.config.shape
        start, stop = shard_range(index, self.config.shard_size, self.source.count)
        return ShardPlan(
            index,
            start,
            stop,
            (channels, resolution, resolution),
            self.config.encoding,
            self.identity,
            self.config.skip_corrupt,
        )


class ShardEncoder(ItemWorker):
    """For every shard index it is given: keeps the shard when the output already holds it for
    this import, encodes and writes it otherwise. Reports the entry (JSON), the skipped images
    (JSON), whether it wrote the shard, the unreadable image that stopped it (``error``), and its
    CPU seconds since its last report."""

    def __init__(self, job: ImportJob):
        self._job = job
        self._cpu_mark = time.process_time()

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        shard = self._job.shard(item["shard"])
        target = self._job.output.join(shard_name(shard.index))
        kept = kept_shard(_read_if_present(target), shard, target.uri) if item["present"] else None
        report = {"entry": "", "skipped": "[]", "written": kept is None, "error": ""}
        try:
            if kept is None:
                with self._source() as source:
                    data, entry, skipped = encode_shard(source, shard)
                target.write_bytes(data)
            else:
                entry, skipped = kept
            report.update(entry=json.dumps(entry.as_dict()), skipped=json.dumps(skipped))
        except CorruptImageError as error:
            report["error"] = str(error)
        cpu = time.process_time()
        report["cpu_seconds"], self._cpu_mark = cpu - self._cpu_mark, cpu
        return {key: [value] for key, value in report.items()}

    @contextmanager
    def _source(self) -> Iterator[Source]:
        """The listed source, or a built-in source materialised on this machine (and checked to
        be the one the driver listed)."""
        job = self._job
        if job.config.source not in BUILTIN:
            yield job.source
            return
        with listed(job.config.source) as source:
            if source.fingerprint != job.source.fingerprint:
                raise ImageImportError(
                    f"built-in source {job.config.source} differs on this machine from the driver's "
                    "(another scikit-learn version?)"
                )
            yield source


def _read_if_present(target: Location) -> bytes:
    """The file's bytes; none when it vanished since the listing (so it is not kept)."""
    try:
        return target.read_bytes()
    except FileNotFoundError:
        return b""


def _reports(job: ImportJob, items: list[dict[str, Any]], parallel: bool) -> Iterator[dict[str, Any]]:
    """The encoders' reports, item by item: from an actor pool, or from one encoder here."""
    if parallel:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
        yield from run_on_actors(ShardEncoder, job, items, workers, cpus=1.0)
        return
    encoder = ShardEncoder(job)
    for item in items:
        yield {key: values[0] for key, values in encoder.process(item).items()}


def _write_import(config: ImportConfig, source: Source, context: StageContext, parallel: bool) -> dict[str, Any]:
    """Encode (or keep) every shard of the import; the manifest's details."""
    info = SourceInfo(kind=source.kind, files=source.count, fingerprint=source.fingerprint)
    identity = import_identity(info, config.shape, config.shard_size, config.encoding)
    job = ImportJob(config, source, identity, context.output)
    total = shard_count(source.count, config.shard_size)
    present = present_shards(context.output, total, "import", ImageImportError)
    ignored = f", {source.ignored} non-image files ignored" if source.ignored else ""
    logger.info(
        "%s %s: %d images in %d shards of %d%s; %d shards present",
        source.kind,
        source.name,
        source.count,
        total,
        config.shard_size,
        ignored,
        len(present),
    )
    items = [{"shard": index, "present": index in present} for index in range(total)]
    entries: dict[int, ShardEntry] = {}
    skipped: list[dict[str, Any]] = []
    written = images_done = images_encoded = 0
    started = last_log = time.perf_counter()
    for report in _reports(job, items, parallel):
        if report["error"]:
            raise CorruptImageError(report["error"])
        entry = ShardEntry.parse(json.loads(report["entry"]), context.output.uri)
        entries[entry.index] = entry
        skipped += json.loads(report["skipped"])
        images_done += entry.stop - entry.start
        if report["written"]:
            written += 1
            images_encoded += entry.stop - entry.start
        if parallel:  # sequential encoding is this process's own CPU time, which the clock counts already
            context.clock.add_worker(report["cpu_seconds"])
        context.check_lease()
        now = time.perf_counter()
        if now - last_log >= _LOG_INTERVAL_S or len(entries) == total:
            last_log, rate = now, images_encoded / max(now - started, 1e-9)
            logger.info(
                "%d/%d shards done, %d/%d images (%.1f images/s)", len(entries), total, images_done, source.count, rate
            )
            context.progress(images_done, source.count, "images", rate)
    shards = [entries[index] for index in range(total)]
    skipped.sort(key=lambda item: item["index"])
    channels, resolution, _ = config.shape
    details = ImportDetails(
        source=info,
        source_name=source.name,
        count=sum(entry.rows for entry in shards),
        shape=config.shape,
        channels=channels,
        resolution=resolution,
        encoding=config.encoding,
        shard_size=config.shard_size,
        shards=shards,
        classes=source.classes,
        skipped=skipped,
        skipped_count=len(skipped),
        bytes=sum(entry.bytes for entry in shards),
        shards_written=written,
    )
    logger.info(
        "done: %d images, %d skipped, %d shards (%d written, %d kept) in %s",
        details.count,
        len(skipped),
        total,
        written,
        total - written,
        context.output.uri,
    )
    return details.model_dump(mode="json")


def _check_shape(config: ImportConfig) -> None:
    shape = config.shape
    if len(shape) != 3 or shape[0] not in (1, 3) or shape[1] < 1 or shape[1] != shape[2]:
        raise ImageImportError(f"shape must be [C, R, R] with C 1 or 3 and R a positive size, got {shape}")


def _missing_shards(output: Location, shards: list[ShardEntry]) -> list[str]:
    """The listed shards that are not in ``output`` with their size (one listing)."""
    sizes = output.list_sizes()
    return [entry.name for entry in shards if sizes.get(entry.name) != entry.bytes]


def import_listed(config: ImportConfig, source: Source, output: Location, parallel: bool | None = None) -> Manifest:
    """Import the listed ``source`` (named ``config.source``) into ``output`` (see the module
    docstring); ``parallel`` None: an actor pool when Ray is initialised."""
    _check_shape(config)
    parallel = ray.is_initialized() if parallel is None else parallel

    def work(context: StageContext) -> dict[str, Any]:
        return _write_import(config, source, context, parallel)

    manifest = run_stage(STAGE_KIND, config, {}, output, work, ImageImportError)
    marker = output.join(SUCCESS_FILE)
    details = ImportDetails.parse(manifest.details, marker.uri)
    found = details.source.model_dump()
    expected = SourceInfo(kind=source.kind, files=source.count, fingerprint=source.fingerprint).model_dump()
    if found != expected:
        raise ImageImportError(
            f"output {output.uri} is a finished import of another source ({describe_differences(expected, found)}): "
            f"{config.source} changed since; choose another output location"
        )
    missing = _missing_shards(output, details.shards)
    if not missing:
        return manifest
    logger.info("%s is finished but misses %s; unmarking it and writing them again", output.uri, ", ".join(missing))
    marker.delete()
    return run_stage(STAGE_KIND, config, {}, output, work, ImageImportError)


def run(config: ImportConfig, inputs: dict[str, Location], output: Location) -> Manifest:
    """Import ``config.source`` into ``output`` (resumable; see the module docstring)."""
    config = ImportConfig.model_validate(config)
    if inputs:
        raise ImageImportError(f"an import stage takes no inputs; got {sorted(inputs)}")
    with listed(config.source) as source:
        return import_listed(config, source, output)
