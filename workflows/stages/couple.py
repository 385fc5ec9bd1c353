"""The coupling stage: reflow pairs (Z0, Z1 = Flow_k(Z0)) of a teacher, as Parquet shards, on Ray Data.

Contract of :func:`run_coupling_stage`:

- **Pairs.** Pair ``i`` is a pure function of (teacher weights, solver, seed, ``i``):
  Z0_i = ``sample_by_id(pi0, seed, [i])`` (counter-based noise) and Z1_i the solver's solution with
  the network evaluated in zero-padded chunks of exactly ``forward_batch`` rows
  (:func:`rf.coupling.generate_pairs`). So the bytes of every shard depend on the identity
  (:meth:`CouplingConfig.identity`) and the teacher, not on ``batch_size``, worker count, block
  boundaries or retries — on one kind of device (a GPU computes other bits than a CPU).
- **Shards** (:mod:`workflows.shards`). Shard ``s`` holds pair ids [s·S, min((s+1)·S, N)) and is
  named ``shard-{s:06d}.parquet``. It is created once, whole (exclusive create: rename on a local
  disk, one conditional PUT on S3) and never replaced.
- **Validation first.** The config, the teacher (loaded once in the driver: finished, loadable,
  input shape equal to π0's), the stage record ``_STAGE.json`` and every shard already in the
  output (footer metadata) are checked before anything is written; a problem raises a
  ``ValueError`` (:class:`CouplingError`, :class:`workflows.shards.ShardError` or pydantic's
  ``ValidationError``) that names it.
- **Exactly once.** ``_STAGE.json`` (the identity and the teacher's hash) is created before the
  first shard. A re-run after any interruption generates only the shards that are missing; the
  existing ones are read once for their checksums. ``_SUCCESS.json``, written last, is the
  manifest (see :func:`_manifest`); when it exists the stage returns it and does nothing else.
- **Hash.** The manifest's ``"hash"`` is :func:`coupling_hash` of the identity and the teacher's
  hash; the pipeline names the stage's folder with the same function.

Progress goes to the ``rectiflow.couple`` logger at INFO: pairs done / total and pairs/s, at most
every few seconds and once at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rf.coupling import Pairs, generate_pairs
from rf.solvers import Solver
from workflows.distributions import DistributionSpec, sample_by_id
from workflows.shards import (
    CouplingFormat,
    ShardEntry,
    StoredDtype,
    encode_shard,
    inspect_shard,
    shard_count,
    shard_name,
    shard_range,
)
from workflows.stage import (
    StageClock,
    code_version,
    describe_differences,
    finished_manifest,
    process_cpu_seconds,
    stage_hash,
    write_manifest,
    write_progress,
)
from workflows.storage import Location
from workflows.weights import load_input_model, load_stage_model

KIND = "couple"
STAGE_FILE = "_STAGE.json"
DEFAULT_SHARD_SIZE = 10_000

_IDENTITY_FIELDS = ("pairs", "shard_size", "solver", "seed", "dtype", "store_x0", "pi0", "forward_batch")
_ENTRY_FIELDS = tuple(field.name for field in dataclasses.fields(ShardEntry))
_SHARD_FILE = re.compile(r"shard-(\d+)\.parquet")
_LOG_INTERVAL_S = 5.0
_READER_THREADS = 8

logger = logging.getLogger("rectiflow.couple")


class CouplingError(ValueError):
    """Bad input for the coupling stage: the teacher, the output location or their combination."""


class CouplingSettings(BaseModel):
    """How pairs are made: how many, in which shards, by which solver, stored how, on what.

    ``shard_size`` defaults to 10 000, or ``pairs`` when there are fewer. ``dtype`` uint8 is for
    x1 of images in [−1, 1] and needs ``store_x0=False`` (x0 is then regenerated from the seed on
    read).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pairs: int = Field(gt=0)
    shard_size: int = Field(ge=1)
    solver: str = "rk45@1e-5"
    dtype: StoredDtype = "float32"
    store_x0: bool = True
    batch_size: int = Field(256, ge=1)
    forward_batch: int = Field(256, ge=1)
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _default_shard_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and "shard_size" not in data and isinstance(data.get("pairs"), int):
            return {**data, "shard_size": max(1, min(DEFAULT_SHARD_SIZE, data["pairs"]))}
        return data

    @field_validator("solver")
    @classmethod
    def _canonical_solver(cls, text: str) -> str:
        return Solver.parse(text).name

    @model_validator(mode="after")
    def _consistent(self) -> "CouplingSettings":
        if self.shard_size > self.pairs:
            raise ValueError(
                f"shard_size ({self.shard_size}) is larger than pairs ({self.pairs}): choose 1 <= shard_size <= pairs"
            )
        if self.dtype == "uint8" and self.store_x0:
            raise ValueError("dtype uint8 stores x1 only: set store_x0 to false (x0 is regenerated from the seed)")
        return self


class CouplingConfig(CouplingSettings):
    """Settings of one coupling stage: the settings plus where Z0 comes from (π0 and the seed).

    ``pairs``, ``shard_size``, ``solver``, ``seed``, ``dtype``, ``store_x0``, ``pi0`` and
    ``forward_batch`` decide the output (:meth:`identity`); ``batch_size`` (ids solved together)
    and the resources only decide how fast it is made.
    """

    seed: int = Field(ge=0, lt=2**64)
    pi0: DistributionSpec

    def identity(self) -> dict[str, Any]:
        """The fields that decide the output's bytes (together with the teacher's hash)."""
        return {**self.model_dump(mode="json", include=set(_IDENTITY_FIELDS)), "pi0": self.pi0.identity()}


def coupling_hash(config: CouplingConfig, teacher_hash: str) -> str:
    """The stage hash of a coupling: its identity and its teacher's hash."""
    return stage_hash(KIND, config.identity(), {"teacher": teacher_hash})


def coupling_format(config: CouplingConfig, teacher_hash: str) -> CouplingFormat:
    """The shard format of the coupling of ``config`` made by the teacher of hash ``teacher_hash``."""
    return CouplingFormat(
        shape=config.pi0.shape,
        dtype=config.dtype,
        x0_stored=config.store_x0,
        seed=config.seed,
        pi0=config.pi0,
        teacher_hash=teacher_hash,
        solver=config.solver,
        shard_size=config.shard_size,
    )


# -- validation (nothing is written here) ---------------------------------------------------------


def _stage_record(config: CouplingConfig, teacher_hash: str) -> dict[str, Any]:
    """The content of ``_STAGE.json``: what every shard of this output must have been made from."""
    return {"kind": KIND, **config.identity(), "teacher_hash": teacher_hash}


def _check_stage_record(output: Location, record: dict[str, Any]) -> bool:
    """Whether ``_STAGE.json`` exists; CouplingError when it records another configuration."""
    marker = output.join(STAGE_FILE)
    if not marker.exists():
        return False
    try:
        found = marker.read_json()
    except ValueError as error:
        raise CouplingError(f"{marker.uri} is unreadable ({error}); delete the output {output.uri} to start over") from None
    if found != record:
        raise CouplingError(
            f"output {output.uri} already holds shards of another configuration "
            f"({describe_differences(record, found)}); choose another output location or delete it"
        )
    return True


def _claim_output(output: Location, record: dict[str, Any]) -> None:
    """Create ``_STAGE.json`` (or find an identical one a concurrent run created first)."""
    if not output.join(STAGE_FILE).create_bytes(_json_bytes(record)):
        _check_stage_record(output, record)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True).encode()


def _report(entry: ShardEntry, nfe: dict[str, int], written: bool) -> dict[str, Any]:
    """One shard as the driver collects it: manifest entry, NFE statistics, written by this run."""
    return {**entry.as_dict(), **nfe, "written": written}


def _existing_shards(output: Location, fmt: CouplingFormat, pairs: int) -> dict[int, dict[str, Any]]:
    """Reports of the shards already in ``output``, each read once and checked against ``fmt``."""
    count = shard_count(pairs, fmt.shard_size)
    present = []
    for name in output.list_names():
        match = _SHARD_FILE.fullmatch(name)
        if match and shard_name(int(match.group(1))) == name:
            present.append(int(match.group(1)))
    beyond = [index for index in present if index >= count]
    if beyond:
        raise CouplingError(
            f"output {output.uri} holds {shard_name(beyond[0])}, but this configuration has only {count} shards "
            f"({pairs} pairs, {fmt.shard_size} a shard): it belongs to another configuration"
        )

    def inspect(index: int) -> dict[str, Any]:
        target = output.join(shard_name(index))
        return _report(*inspect_shard(target.read_bytes(), fmt, index, pairs, target.uri), written=False)

    with ThreadPoolExecutor(_READER_THREADS) as pool:
        return {report["index"]: report for report in pool.map(inspect, sorted(present))}


# -- the work on the actors -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Everything a shard writer needs, sent once to each actor."""

    teacher: Location
    output: Location
    format: CouplingFormat
    pairs: int
    batch_size: int
    forward_batch: int
    cpus: float
    gpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


class ShardWriter:
    """The Ray Data UDF of the stage, one per actor: loads the teacher (its EMA weights) once, then
    turns every shard index it is given into a shard file and a row of statistics."""

    def __init__(self, job: ShardJob):
        self._cpu_mark = time.process_time()
        torch.set_num_threads(max(1, int(job.cpus)))
        model, manifest = load_stage_model(job.teacher)
        if manifest.get("hash") != job.format.teacher_hash:
            raise CouplingError(
                f"teacher {job.teacher.uri} changed while the coupling ran: hash {manifest.get('hash')}, "
                f"expected {job.format.teacher_hash}"
            )
        self._model = model.to(job.device)
        self._solver = Solver.parse(job.format.solver)
        self._job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reports = [self.write_shard(int(index)) for index in batch["shard"]]
        return {key: np.array([report[key] for report in reports]) for key in reports[0]}

    def write_shard(self, index: int) -> dict[str, Any]:
        """Generate shard ``index`` and create its file, unless an earlier attempt or a concurrent
        run created it first (then that file is reported). Returns the shard's report with the CPU
        seconds of this actor since its last report (its start-up included) and the GPU-seconds it
        held for this shard."""
        started = time.perf_counter()
        target = self._job.output.join(shard_name(index))
        data = self._encode(index)
        written = target.create_bytes(data)
        if not written:
            data = target.read_bytes()
        report = _report(*inspect_shard(data, self._job.format, index, self._job.pairs, target.uri), written)
        wall, cpu = time.perf_counter() - started, time.process_time()
        cpu, self._cpu_mark = cpu - self._cpu_mark, cpu
        return {**report, "cpu_seconds": cpu, "gpu_seconds": wall * self._job.gpus}

    def _encode(self, index: int) -> bytes:
        job = self._job
        start, stop = shard_range(index, job.format.shard_size, job.pairs)
        ids = np.arange(start, stop, dtype=np.int64)
        parts = [self._solve(ids[i : i + job.batch_size]) for i in range(0, len(ids), job.batch_size)]
        x0, x1, nfe = (torch.cat([getattr(part, name) for part in parts]) for name in ("x0", "x1", "nfe"))
        return encode_shard(job.format, index, ids, x0, x1, nfe)

    def _solve(self, ids: np.ndarray) -> Pairs:
        fmt = self._job.format
        x0 = sample_by_id(fmt.pi0, fmt.seed, ids)
        return generate_pairs(self._model, self._solver, x0, chunk=self._job.forward_batch, device=self._job.device)


def _write_missing(job: ShardJob, missing: list[int], workers: int) -> Iterator[dict[str, Any]]:
    """Run the shard writers on an actor pool over the ``missing`` shard indices; yields each
    shard's report as it finishes. One shard in flight per actor, so an actor that starts late
    still gets its share. A killed actor is restarted and its shard redone: Ray Data's actor
    pools default to ``max_restarts=-1, max_task_retries=-1`` (passing them through
    ``ray_remote_args`` is deprecated), and a redone shard finds its file if it was created."""
    items = ray.data.from_items([{"shard": index} for index in missing], override_num_blocks=len(missing))
    reports = items.map_batches(
        ShardWriter,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(missing)), max_tasks_in_flight_per_actor=1),
        num_cpus=job.cpus,
        num_gpus=job.gpus or None,
    )
    for row in reports.iter_rows():
        yield {key: value.item() if isinstance(value, np.generic) else value for key, value in row.items()}


class _Progress:
    """Logs pairs done / total and the pairs/s of this run, at most every few seconds and at the
    end, and records them in the output's ``_PROGRESS.json``."""

    def __init__(self, output: Location, total: int, done: int):
        self.output = output
        self.total, self.done, self.generated = total, done, 0
        self._start = self._last = time.perf_counter()

    def add(self, rows: int) -> None:
        self.done += rows
        self.generated += rows
        now = time.perf_counter()
        if now - self._last >= _LOG_INTERVAL_S or self.done == self.total:
            self._last = now
            logger.info(
                "coupling: %d/%d pairs (%.1f%%), %.1f pairs/s",
                self.done, self.total, 100.0 * self.done / self.total, self.rate,
            )
            write_progress(self.output, self.done, self.total, "pairs", self.rate)

    @property
    def rate(self) -> float:
        return self.generated / max(time.perf_counter() - self._start, 1e-9)


# -- the stage ------------------------------------------------------------------------------------


def _manifest(
    config: CouplingConfig,
    fmt: CouplingFormat,
    teacher: Location,
    output: Location,
    reports: dict[int, dict[str, Any]],
    clock: StageClock,
    pairs_per_second: float,
) -> dict[str, Any]:
    """``_SUCCESS.json``: what :meth:`workflows.shards.Coupling.open` reads (hash, coupling, shards,
    pairs) and what a user needs to trust the pairs (teacher, solver, NFE, dtype and shape,
    checksums, wall time, CPU/GPU-seconds of this run, bytes)."""
    ordered = [reports[index] for index in sorted(reports)]
    written = [report for report in ordered if report["written"]]
    nfe_total = sum(report["nfe_sum"] for report in ordered)
    return {
        "kind": KIND,
        "hash": coupling_hash(config, fmt.teacher_hash),
        "config": config.model_dump(mode="json"),
        "identity": config.identity(),
        "inputs": {"teacher": {"uri": teacher.uri, "hash": fmt.teacher_hash}},
        "coupling": fmt.model_dump(mode="json"),
        "pairs": config.pairs,
        "shards": [ShardEntry(**{name: report[name] for name in _ENTRY_FIELDS}).as_dict() for report in ordered],
        "solver": fmt.solver,
        "dtype": fmt.dtype,
        "shape": fmt.shape,
        "x0_stored": fmt.x0_stored,
        "nfe": {
            "total": nfe_total,
            "mean": nfe_total / config.pairs,
            "min": min(report["nfe_min"] for report in ordered),
            "max": max(report["nfe_max"] for report in ordered),
        },
        "bytes": sum(report["bytes"] for report in ordered),
        "bytes_written": sum(report["bytes"] for report in written),
        "shards_written": len(written),
        "shards_reused": len(ordered) - len(written),
        "pairs_per_second": round(pairs_per_second, 3),
        "time": clock.summary(),
        "code": code_version(),
    }


def run_coupling_stage(config: CouplingConfig, teacher: Location, output: Location) -> dict[str, Any]:
    """Generate the coupling of ``config`` from the finished training stage ``teacher`` into
    ``output`` (see the module docstring for the contract); returns the manifest.

    Validates everything before writing anything; when ``output`` is already finished, returns
    its manifest without loading the teacher."""
    config = CouplingConfig.model_validate(config)
    finished = finished_manifest(output, KIND, "coupling", {"identity": config.identity()}, CouplingError)
    if finished is not None:
        logger.info("coupling %s is finished; nothing to do", output.uri)
        return finished
    clock, driver_cpu = StageClock(), process_cpu_seconds()
    _, teacher_hash = load_input_model(teacher, "teacher", config.pi0.shape, CouplingError)
    fmt = coupling_format(config, teacher_hash)
    record = _stage_record(config, teacher_hash)
    claimed = _check_stage_record(output, record)
    reports = _existing_shards(output, fmt, config.pairs)
    if not claimed:
        _claim_output(output, record)

    missing = [index for index in range(shard_count(config.pairs, config.shard_size)) if index not in reports]
    progress = _Progress(output, config.pairs, sum(report["rows"] for report in reports.values()))
    logger.info(
        "coupling %s: %d of %d shards to generate (%d pairs left, solver %s) on %d worker(s)",
        output.uri, len(missing), len(missing) + len(reports), config.pairs - progress.done,
        config.solver, config.workers,
    )
    if config.batch_size < config.forward_batch:
        logger.warning(
            "batch_size %d < forward_batch %d: every network call is padded to %d rows",
            config.batch_size, config.forward_batch, config.forward_batch,
        )
    if missing:
        job = ShardJob(
            teacher, output, fmt, config.pairs, config.batch_size, config.forward_batch,
            config.cpus_per_worker, config.gpus_per_worker,
        )
        for report in _write_missing(job, missing, config.workers):
            reports[report["index"]] = report
            clock.add_worker(report["cpu_seconds"], report["gpu_seconds"])
            progress.add(report["rows"])
    clock.add_worker(process_cpu_seconds() - driver_cpu)
    manifest = _manifest(config, fmt, teacher, output, reports, clock, progress.rate)
    write_manifest(output, manifest)
    return manifest
