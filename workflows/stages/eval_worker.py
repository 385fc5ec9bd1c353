"""The evaluation's worker: solves blocks of sample ids with every sampler and writes, per sample,
what the scores need — so no sample ever passes through the driver.

An item is a block of ids [start, stop) and a part:

- ``model``: Z0_i = ``sample_by_id(pi0, seed, i)``; the reference solve Z1_ref (the model's own
  ``reference_solver``, or its teacher's for a distilled model); then for every solver its Z1, NFE,
  straightness S_i = Σ_k Δt_k ‖(Z1 − Z0) − ΔZ_k/Δt_k‖², transport ‖Z1 − Z0‖, distance
  ‖Z1 − Z1_ref‖ (float64 norms), the image features (classifier, InceptionV3 pool3 and logits),
  Z1 itself for ids below ``keep`` (the OT subset and the figures), and the path of ids below
  ``trajectories``;
- ``reference``: π1's reference sample X1_i = ``sample_by_id(pi1, seed + 1, i)`` (solver −1:
  the independent pairs (Z0, X1), whose transport is the independent cost) with its features.

Each item writes one Parquet file ``blocks/{part}-{start:09d}.parquet`` under the stage's attempt
folder (overwritten whole; an item is a pure function of its ids, so a retried item writes the
same bytes) and returns its seconds. The network runs in fixed-shape chunks of ``forward_batch``
rows and RK45 controls its error per sample, so nothing depends on the block size or worker count.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rf.coupling import FixedShapeVelocity
from rf.metrics import extract_features, load_inception, straightness_per_sample
from rf.paths import make_path
from rf.solvers import Solver
from workflows.actor_pool import ItemWorker
from workflows.distributions import sample_by_id
from workflows.eval_files import table_bytes, vectors
from workflows.settings import DistributionSpec
from workflows.storage import Location
from workflows.weights import load_stage_model

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
BLOCKS_DIR = "blocks"


class EvalError(ValueError):
    """Bad input for the evaluation stage: the model, the config or the output location."""


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """Everything a worker needs, sent once to each actor."""

    model: Location
    model_hash: str
    teacher: Location | None
    teacher_hash: str | None
    classifier: Location | None
    inception: str | None
    pi0: DistributionSpec
    pi1: DistributionSpec
    path: str
    seed: int
    solvers: tuple[str, ...]
    reference_solver: str
    keep: int
    trajectories: int
    trajectory_states: int
    forward_batch: int
    precision: str
    attempt: Location
    cpus: float
    gpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"

    def block_file(self, part: str, start: int) -> Location:
        return self.attempt.join(BLOCKS_DIR, f"{part}-{start:09d}.parquet")


def own_states(times: torch.Tensor, states: torch.Tensor, limit: int) -> bytes:
    """One sample's path as float32 rows (t, Z_t…) in raw bytes: the states at which its time
    advanced (the start included), thinned to at most ``limit`` evenly spaced ones (first and
    last kept). :func:`workflows.eval_files.path_rows` reads them back."""
    advanced = torch.cat([torch.ones(1, dtype=torch.bool), times[1:] > times[:-1]])
    rows = torch.cat([times[advanced, None].double(), states[advanced].double()], dim=1)
    if len(rows) > limit:
        rows = rows[np.unique(np.round(np.linspace(0, len(rows) - 1, limit)).astype(np.int64))]
    return rows.numpy().astype(np.float32).tobytes()


def _velocity(stage: Location, expected_hash: str, job: EvalJob, role: str) -> FixedShapeVelocity:
    model, manifest = load_stage_model(stage)
    if manifest.hash != expected_hash:
        raise EvalError(
            f"{role} {stage.uri} changed while the evaluation ran: hash {manifest.hash}, expected {expected_hash}"
        )
    return FixedShapeVelocity(model.to(job.device), job.forward_batch, autocast_dtype=PRECISIONS[job.precision])


class Features:
    """The image feature extractors of an evaluation (classifier, InceptionV3), loaded once."""

    def __init__(self, job: EvalJob):
        from workflows.stages.classifier import load_classifier
        from workflows.storage import location

        self.classifier = load_classifier(job.classifier)[0].to(job.device) if job.classifier else None
        self.inception = None
        if job.inception is not None:
            weights = location(job.inception)
            with tempfile.TemporaryDirectory() as folder:
                local = Path(folder) / (Path(weights.path).name or "inception.safetensors")
                local.write_bytes(weights.read_bytes())
                self.inception = load_inception(str(local), job.device)

    @torch.inference_mode()
    def columns(self, images: torch.Tensor) -> dict[str, pa.Array]:
        out: dict[str, pa.Array] = {}
        if self.classifier is not None:
            features = self.classifier.features(images)
            out["classifier"] = vectors(features.float().cpu().numpy())
            out["classifier_logits"] = vectors(self.classifier.classify(features).float().cpu().numpy())
        if self.inception is not None:
            features, logits = extract_features(self.inception, images)
            out["inception"], out["logits"] = vectors(features.numpy()), vectors(logits.numpy())
        return out


class EvalWorker(ItemWorker):
    """One per actor: loads the model (and a distilled model's teacher, and the feature
    extractors) once, then turns blocks of ids into block files (see the module docstring)."""

    def __init__(self, job: EvalJob):
        torch.set_num_threads(max(1, int(job.cpus)))
        self._velocity = _velocity(job.model, job.model_hash, job, "model")
        self._teacher = _velocity(job.teacher, job.teacher_hash, job, "teacher") if job.teacher else None
        self._features = Features(job) if len(job.pi0.shape) == 3 else None
        self._solvers = [Solver.parse(name) for name in job.solvers]
        self._path = make_path(job.path)
        self._job = job

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        """Write the item's block file; one row per solver (solver −1 for the reference part) with
        the wall, CPU (shared in proportion to wall time) and GPU seconds it took."""
        job, started, cpu = self._job, time.perf_counter(), time.process_time()
        ids = np.arange(item["start"], item["stop"], dtype=np.int64)
        if item["part"] == "reference":
            table, seconds = self._reference(ids), {-1: time.perf_counter() - started}
        else:
            table, seconds = self._model(ids)
        job.block_file(item["part"], item["start"]).write_bytes(table_bytes(table))
        cpu, wall = time.process_time() - cpu, max(sum(seconds.values()), 1e-12)
        return {
            "solver": list(seconds),
            "wall_seconds": list(seconds.values()),
            "cpu_seconds": [cpu * value / wall for value in seconds.values()],
            "gpu_seconds": [value * job.gpus for value in seconds.values()],
        }

    @torch.inference_mode()
    def _model(self, ids: np.ndarray) -> tuple[pa.Table, dict[int, float]]:
        job = self._job
        x0 = sample_by_id(job.pi0, job.seed, ids, device=job.device)  # drawn where the model runs
        solutions, seconds = [], {}
        for j, solver in enumerate(self._solvers):
            started = time.perf_counter()
            solutions.append(
                solver.solve(
                    self._velocity,
                    x0,
                    return_trajectory=True,
                    path=self._path,
                    seed=job.seed,
                    ids=torch.from_numpy(ids),
                )
            )
            seconds[j] = time.perf_counter() - started
        if self._teacher is not None:
            reference = Solver.parse(job.reference_solver).solve(self._teacher, x0).x
        else:
            reference = solutions[job.solvers.index(job.reference_solver)].x
        parts = [self._columns(j, ids, x0, solution, reference) for j, solution in enumerate(solutions)]
        return pa.concat_tables(parts), seconds

    def _columns(self, j: int, ids: np.ndarray, x0: torch.Tensor, solution: Any, reference: torch.Tensor) -> pa.Table:
        job, x1 = self._job, solution.x
        kept = int(np.count_nonzero(ids < job.trajectories))  # ids are ascending: the first rows
        times = torch.stack([t[:kept].cpu() for t, _ in solution.trajectory], dim=1)
        states = torch.stack([z[:kept].flatten(1).cpu() for _, z in solution.trajectory], dim=1)
        paths = [own_states(times[row], states[row], job.trajectory_states) for row in range(kept)]
        columns = {
            "solver": pa.array(np.full(len(ids), j, dtype=np.int64)),
            "id": pa.array(ids),
            "nfe": pa.array(solution.nfe.cpu().numpy().astype(np.int64)),
            "straightness": pa.array(straightness_per_sample(solution.trajectory).double().cpu().numpy()),
            **self._sample_columns(ids, x0, x1, reference),
            "path": pa.array(paths + [None] * (len(ids) - kept), pa.binary()),
        }
        return pa.table(columns)

    def _sample_columns(
        self, ids: np.ndarray, x0: torch.Tensor, x1: torch.Tensor, reference: torch.Tensor | None
    ) -> dict[str, pa.Array]:
        """Transport (and distance to ``reference``) per sample, Z1 below ``keep``, features."""
        job = self._job
        flat0, flat1 = x0.flatten(1).cpu().numpy(), x1.flatten(1).cpu().numpy()
        columns = {"transport": pa.array(_norms(flat1, flat0))}
        if reference is not None:
            columns["distance"] = pa.array(_norms(flat1, reference.flatten(1).cpu().numpy()))
        kept = int(np.count_nonzero(ids < job.keep))
        values = vectors(flat1)
        columns["x1"] = (
            pa.FixedSizeListArray.from_arrays(
                values.values,
                values.type.list_size,
                mask=pa.array(np.arange(len(ids)) >= kept),
            )
            if kept < len(ids)
            else values
        )
        if self._features is not None:
            columns.update(self._features.columns(x1.float()))
        return columns

    @torch.inference_mode()
    def _reference(self, ids: np.ndarray) -> pa.Table:
        job = self._job
        x0 = sample_by_id(job.pi0, job.seed, ids)
        x1 = sample_by_id(job.pi1, job.seed + 1, ids)
        columns = {
            "solver": pa.array(np.full(len(ids), -1, dtype=np.int64)),
            "id": pa.array(ids),
            **self._sample_columns(ids, x0, x1.to(job.device), None),
        }
        return pa.table(columns)


def _norms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """‖a_i − b_i‖ in float64 of float32 rows (as :func:`rf.metrics.transport_cost` computes them)."""
    return np.linalg.norm(a.astype(np.float64) - b.astype(np.float64), axis=1)
