"""Running a plan: stages in dependency order, independent ones at the same time, each under its
lease, finished ones skipped without loading anything.

Durability comes from storage, not from Ray: a stage is done when its ``_SUCCESS.json`` exists.
A re-run after any failure skips what is done, resumes what is half done (missing shards only;
training from its last checkpoint) and runs the rest. A failed stage blocks only the stages that
need it; the others still run, and the run then fails naming every failed stage.

A stage that fails because Ray lost the processes or the node it ran on (:data:`~workflows.ray_errors.NODE_LOSS`: an
actor that cannot be placed or restarted, a dead node, a lost object — e.g. Ray Data's actor pool
when a worker node disappears) is run again at once, up to :data:`STAGE_RETRIES` times, under the
same lease: since a stage resumes from what it has written, the retry redoes only what was lost.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from workflows.lease import Lease, holding, probe_conditional_writes
from workflows.manifest import Manifest, is_done, read_manifest
from workflows.plan import Plan, StagePlan
from workflows.ray_errors import lost_to_ray
from workflows.stage import read_progress

logger = logging.getLogger("rectiflow.pipeline")

PENDING, WAITING, RUNNING, DONE, CACHED, FAILED, BLOCKED = (
    "pending",
    "waiting",
    "running",
    "done",
    "cached",
    "failed",
    "blocked",
)
FINISHED = {DONE, CACHED}


STAGE_RETRIES = 2


class PipelineFailed(RuntimeError):
    """Some stages failed; ``failures`` maps their names to the error."""

    def __init__(self, failures: dict[str, BaseException], blocked: list[str]):
        self.failures = failures
        lines = [f"  {name}: {type(error).__name__}: {error}" for name, error in failures.items()]
        if blocked:
            lines.append(f"  not run because of them: {', '.join(blocked)}")
        super().__init__("the pipeline failed:\n" + "\n".join(lines))


@dataclass
class StageStatus:
    """What the live table shows about a stage."""

    stage: StagePlan
    state: str = PENDING
    started: float | None = None
    finished: float | None = None
    error: BaseException | None = None

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.finished or now) - self.started


STAGE_MODULES = {
    "import": "workflows.stages.import_images",
    "train": "workflows.stages.train",
    "couple": "workflows.stages.couple",
    "classifier": "workflows.stages.classifier",
    "eval": "workflows.stages.evaluate",
    "report": "workflows.stages.report",
}
"""The module of each stage kind; each has ``run(config, inputs, output) -> Manifest``."""


def stage_function(kind: str) -> Callable[..., Manifest]:
    return importlib.import_module(STAGE_MODULES[kind]).run


class PipelineRun:
    """Executes a :class:`Plan`; ``statuses`` is what a live table reads."""

    def __init__(self, plan: Plan, wait_for_leases: bool = True, lease_ttl: float = 60.0):
        self.plan = plan
        self.wait_for_leases = wait_for_leases
        self.lease_ttl = lease_ttl
        self.run_id = uuid.uuid4().hex[:12]
        self.statuses = {name: StageStatus(stage) for name, stage in plan.stages.items()}
        self._lock = threading.Lock()

    def _set(self, name: str, state: str, error: BaseException | None = None) -> None:
        with self._lock:
            status = self.statuses[name]
            status.state = state
            now = time.time()
            if state == RUNNING:
                status.started = now
            if state in (DONE, FAILED):
                status.finished = now
            status.error = error
        logger.debug("stage %s: %s", name, state)

    def _execute(self, stage: StagePlan) -> None:
        """Run one stage under its lease (skipped if another run finished it meanwhile)."""
        lease = Lease(stage.output, self.run_id, ttl=self.lease_ttl)
        self._set(stage.name, WAITING)
        lease.acquire(wait=self.wait_for_leases)
        try:
            if is_done(stage.output):
                self._set(stage.name, CACHED)
                return
            self._set(stage.name, RUNNING)
            with holding(lease):
                self._run_again_if_lost_to_ray(stage)
            self._set(stage.name, DONE)
        finally:
            lease.release()

    def _run_again_if_lost_to_ray(self, stage: StagePlan) -> None:
        """Run the stage; when Ray lost its processes or node, run it again (it resumes from what it
        wrote), at most :data:`STAGE_RETRIES` times; any other error fails it at once."""
        run = stage_function(stage.kind)
        for retry in range(STAGE_RETRIES + 1):
            try:
                return run(stage.config, self.plan.inputs_of(stage), stage.output)
            except Exception as error:
                if retry == STAGE_RETRIES or not lost_to_ray(error):
                    raise
                logger.warning(
                    "stage %s lost Ray processes or a node (%s: %s); running it again (%d of %d)",
                    stage.name,
                    type(error).__name__,
                    error,
                    retry + 1,
                    STAGE_RETRIES,
                )

    def _ready(self, name: str) -> bool:
        return all(self.statuses[need].state in FINISHED for need in self.plan.stages[name].needs)

    def _block_dependents(self, failed: str) -> None:
        for name, stage in self.plan.stages.items():
            if failed in stage.needs and self.statuses[name].state == PENDING:
                self._set(name, BLOCKED)
                self._block_dependents(name)

    def run(self) -> Manifest:
        """Run every stage that is not finished; returns the report stage's manifest. Refuses, before
        any work, a storage root that ignores conditional writes (leases could not exclude)."""
        probe_conditional_writes(self.plan.run)
        self.plan.document_location.write_json(self.plan.document())
        for name, stage in self.plan.stages.items():
            if is_done(stage.output):
                Lease(stage.output, self.run_id, ttl=self.lease_ttl).clear_stale()
                self._set(name, CACHED)
        failures: dict[str, BaseException] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(self.plan.stages))) as pool:
            running: dict[Future, str] = {}
            while True:
                for name, status in self.statuses.items():
                    if status.state == PENDING and self._ready(name):
                        self._set(name, WAITING)
                        running[pool.submit(self._execute, self.plan.stages[name])] = name
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    error = future.exception()
                    if error is not None:
                        failures[name] = error
                        self._set(name, FAILED, error)
                        self._block_dependents(name)
        if failures:
            blocked = [name for name, status in self.statuses.items() if status.state == BLOCKED]
            raise PipelineFailed(failures, blocked)
        return read_manifest(self.plan.stages["report"].output)

    def progress(self, name: str) -> dict | None:
        """The stage's last recorded progress (only while it runs)."""
        status = self.statuses[name]
        return read_progress(status.stage.output) if status.state == RUNNING else None
