"""The coupling stage: reflow pairs (Z0, Z1 = Flow_k(Z0)) of a teacher, as Parquet shards, on Ray.

``run(config: CouplingConfig, inputs={"teacher": stage}, output) → Manifest``:

- **Pairs.** Pair ``i`` is a pure function of (teacher weights, solver, precision, seed, ``i``):
  Z0_i = ``sample_by_id(pi0, seed, [i])`` (counter-based noise) and Z1_i the solver's solution with
  the network evaluated in zero-padded chunks of exactly ``forward_batch`` rows
  (:func:`rf.coupling.generate_pairs`). So the bytes of every shard depend on the config's
  identity and the teacher, not on ``batch_size``, worker count, block boundaries or retries — on
  one kind of device (a GPU computes other bits than a CPU).
- **Shards** (:mod:`workflows.couplings`). Shard ``s`` holds pair ids [s·S, min((s+1)·S, N)); it
  is created once, whole (exclusive create: a link on a local disk, one conditional PUT on S3)
  and never replaced, so a writer that lost the stage's lease can only write identical bytes.
- **Validation first.** The config, the teacher (loaded once: finished, loadable, input shape
  equal to π0's), the stage record ``_STAGE.json`` and the names in one listing of the output are
  checked before anything is written; a problem raises :class:`CouplingError` naming it.
- **Exactly once, and a driver that reads no shard.** The shards an earlier run wrote are read
  and inspected by the actors first (their checksums and NFE statistics for the manifest; one
  that belongs to another coupling stops the stage before anything is written). Then
  ``_STAGE.json`` (the identity and the teacher's hash) is created, and the actors generate the
  missing shards. The driver only lists names and gathers the small per-shard reports.

Progress goes to the ``rectiflow.couple`` logger at INFO (pairs done / total, pairs/s, at most
every few seconds) and to ``_PROGRESS.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import numpy as np
import torch

from rf.coupling import Pairs, generate_pairs
from rf.memory import inference_batch
from rf.solvers import Solver
from workflows.actor_pool import ItemWorker, run_on_actors
from workflows.couplings import CouplingFormat, encode_shard, inspect_shard
from workflows.distributions import sample_by_id
from workflows.manifest import Manifest, describe_differences
from workflows.settings import CouplingConfig
from workflows.shard_format import ShardEntry, present_shards, shard_count, shard_name, shard_range
from workflows.stage import StageContext, run_stage
from workflows.storage import Location
from workflows.weights import load_input_model, load_stage_model

KIND = "couple"
STAGE_FILE = "_STAGE.json"
_LOG_INTERVAL_S = 5.0
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

logger = logging.getLogger("rectiflow.couple")


class CouplingError(ValueError):
    """Bad input for the coupling stage: the teacher, the output location or their combination."""


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


def _claim_output(output: Location, record: dict[str, Any]) -> None:
    """Create ``_STAGE.json`` (or find an identical one); CouplingError when it records another
    configuration."""
    if not output.join(STAGE_FILE).create_bytes(json.dumps(record, indent=1, sort_keys=True).encode()):
        _check_record(output, record)


def _check_record(output: Location, record: dict[str, Any]) -> None:
    """CouplingError when ``_STAGE.json`` exists and records another configuration."""
    marker = output.join(STAGE_FILE)
    if not marker.exists():
        return
    try:
        found = marker.read_json()
    except ValueError as error:
        raise CouplingError(
            f"{marker.uri} is unreadable ({error}); delete the output {output.uri} to start over"
        ) from None
    if found != record:
        raise CouplingError(
            f"output {output.uri} already holds shards of another configuration "
            f"({describe_differences(record, found)}); choose another output location or delete it"
        )


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Everything a shard writer needs, sent once to each actor."""

    teacher: Location
    output: Location
    format: CouplingFormat
    pairs: int
    batch_size: int
    forward_batch: int
    precision: str
    compile: bool
    cpus: float
    gpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


class ShardWriter(ItemWorker):
    """One per actor: loads the teacher (its EMA weights) once, then for every shard index it is
    given creates the shard — or, when the shard exists, reads it — and reports its entry."""

    def __init__(self, job: ShardJob):
        self._cpu_mark = time.process_time()
        torch.set_num_threads(max(1, int(job.cpus)))
        model, manifest = load_stage_model(job.teacher)
        if manifest.hash != job.format.teacher_hash:
            raise CouplingError(
                f"teacher {job.teacher.uri} changed while the coupling ran: hash {manifest.hash}, "
                f"expected {job.format.teacher_hash}"
            )
        self._model = model.to(job.device)
        self._solver = Solver.parse(job.format.solver)
        self._job = job

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        """Shard ``item["shard"]``: generated and created unless ``item["present"]`` or a concurrent
        writer created it first (then the file is read). Reports the entry, NFE statistics, whether
        this run wrote it, the actor's CPU seconds since its last report and the GPU seconds held."""
        index, started, job = item["shard"], time.perf_counter(), self._job
        target = job.output.join(shard_name(index))
        written = False
        if not item["present"]:
            data = self._encode(index)
            written = target.create_bytes(data)
        if not written:
            data = target.read_bytes()
        entry, nfe = inspect_shard(data, job.format, index, job.pairs, target.uri)
        cpu = time.process_time()
        cpu, self._cpu_mark = cpu - self._cpu_mark, cpu
        report = {
            **entry.as_dict(),
            **nfe,
            "written": written,
            "cpu_seconds": cpu,
            "gpu_seconds": (time.perf_counter() - started) * job.gpus,
        }
        return {key: [value] for key, value in report.items()}

    def _encode(self, index: int) -> bytes:
        job = self._job
        ids = np.arange(*shard_range(index, job.format.shard_size, job.pairs), dtype=np.int64)
        parts = [self._solve(ids[i : i + job.batch_size]) for i in range(0, len(ids), job.batch_size)]
        x0, x1, nfe = (torch.cat([getattr(part, name) for part in parts]) for name in ("x0", "x1", "nfe"))
        return encode_shard(job.format, index, ids, x0, x1, nfe)

    def _solve(self, ids: np.ndarray) -> Pairs:
        job = self._job
        x0 = sample_by_id(job.format.pi0, job.format.seed, ids, device=job.device)  # drawn where the model runs
        return generate_pairs(
            self._model,
            self._solver,
            x0,
            chunk=job.forward_batch,
            device=job.device,
            autocast_dtype=PRECISIONS[job.precision],
            compile=job.compile,
        )


class _Progress:
    """Logs pairs done / total and the pairs/s of this run, at most every few seconds and at the
    end, and records them in ``_PROGRESS.json``."""

    def __init__(self, context: StageContext, total: int):
        self.context, self.total, self.done, self.generated = context, total, 0, 0
        self._start = self._last = time.perf_counter()

    def add(self, rows: int, generated: bool) -> None:
        self.done += rows
        self.generated += rows if generated else 0
        now = time.perf_counter()
        if now - self._last >= _LOG_INTERVAL_S or self.done == self.total:
            self._last = now
            logger.info(
                "coupling: %d/%d pairs (%.1f%%), %.1f pairs/s",
                self.done,
                self.total,
                100.0 * self.done / self.total,
                self.rate,
            )
            self.context.progress(self.done, self.total, "pairs", self.rate)

    @property
    def rate(self) -> float:
        return self.generated / max(time.perf_counter() - self._start, 1e-9)


def _make_coupling(config: CouplingConfig, context: StageContext) -> dict[str, Any]:
    output, teacher = context.output, context.inputs["teacher"]
    model, teacher_hash = load_input_model(teacher, "teacher", config.pi0.shape, CouplingError)
    forward_batch = config.forward_batch or inference_batch(model, config.pi0.shape, config.memory_budget_mb * 2**20)
    fmt = coupling_format(config, teacher_hash)
    count = shard_count(config.pairs, config.shard_size)
    present = present_shards(output, count, "coupling", CouplingError)
    _check_record(output, {"kind": KIND, **config.identity(), "teacher_hash": teacher_hash})
    logger.info(
        "coupling %s: %d of %d shards to generate (solver %s) on %d worker(s)",
        output.uri,
        count - len(present),
        count,
        config.solver,
        config.workers,
    )
    if config.batch_size < forward_batch:
        logger.warning(
            "batch_size %d < forward_batch %d: every network call is padded to %d rows",
            config.batch_size,
            forward_batch,
            forward_batch,
        )
    job = ShardJob(
        teacher,
        output,
        fmt,
        config.pairs,
        config.batch_size,
        forward_batch,
        config.precision,
        config.compile,
        config.cpus_per_worker,
        config.gpus_per_worker,
    )
    progress, reports = _Progress(context, config.pairs), {}

    def gather(items: list[dict[str, Any]]) -> None:
        for report in run_on_actors(
            ShardWriter, job, items, config.workers, config.cpus_per_worker, config.gpus_per_worker
        ):
            reports[report["index"]] = report
            context.clock.add_worker(report["cpu_seconds"], report["gpu_seconds"])
            progress.add(report["rows"], report["written"])
            context.check_lease()

    # First the shards an earlier run left, inspected by the workers: one of another coupling
    # stops the stage before it writes anything. Then the record, then the missing shards.
    gather([{"shard": index, "present": True} for index in sorted(present)])
    _claim_output(output, {"kind": KIND, **config.identity(), "teacher_hash": teacher_hash})
    gather([{"shard": index, "present": False} for index in range(count) if index not in present])
    ordered = [reports[index] for index in range(count)]
    written = [report for report in ordered if report["written"]]
    nfe_total = sum(report["nfe_sum"] for report in ordered)
    fields = ShardEntry.__dataclass_fields__
    return {
        "summary": f"{config.pairs} pairs by {config.solver} (mean NFE {nfe_total / config.pairs:.1f}), {config.dtype}"
        f"{'' if config.store_x0 else ', x0 from the seed'}",
        "format": fmt.model_dump(mode="json"),
        "pairs": config.pairs,
        "shards": [{name: report[name] for name in fields} for report in ordered],
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
        "pairs_per_second": round(progress.rate, 3),
        "forward_batch": forward_batch,
    }


def run(config: CouplingConfig, inputs: dict[str, Location], output: Location) -> Manifest:
    """Generate (or resume, or return finished) the coupling of ``config`` from the finished
    training stage ``inputs["teacher"]`` into ``output`` (see the module docstring)."""
    config = CouplingConfig.model_validate(config)
    if set(inputs) != {"teacher"}:
        raise CouplingError(f"a coupling stage takes one input, teacher; got {sorted(inputs)}")
    return run_stage(KIND, config, inputs, output, lambda context: _make_coupling(config, context), CouplingError)
