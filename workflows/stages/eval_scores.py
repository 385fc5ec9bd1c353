"""The evaluation's scoring tasks: from the block files of :mod:`workflows.stages.eval_worker` to one
metrics row per sampler, and the small tables the report draws — in Ray tasks, never the driver.

A sampler's row: NFE (mean, max), straightness, transport cost and distance to the reference
solve (means over all M samples, summed in id order), pairing ratio and crossing % of its first
``ot_samples`` pairs, W2 and MMD² of those Z1 against π1's reference sample, and the image scores
(:mod:`rf.metrics.quality`) over all M features. The features of M samples live only in the
task that scores them (at 50k × 2048 floats, 400 MB on a GPU worker); the driver receives rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from rf.metrics import classifier_quality, inception_quality, subset_coupling_metrics, vector_quality
from workflows.distributions import sample_by_id
from workflows.eval_files import INDEPENDENT, column_array, path_rows, read_table, vectors
from workflows.settings import DistributionSpec
from workflows.storage import Location

REFERENCE = -1
"""The solver number of π1's reference sample (the independent pairs)."""


@dataclasses.dataclass(frozen=True)
class ScoreJob:
    """Where the block files are and what the scores need."""

    files: tuple[Location, ...]
    reference_files: tuple[Location, ...]
    pi0: DistributionSpec
    seed: int
    samples: int
    ot_samples: int
    shape: tuple[int, ...]

    def rows_of(self, solver: int, columns: list[str]) -> pa.Table:
        """Every sample of ``solver`` (id order) with ``columns`` present in its block files."""
        files = self.reference_files if solver == REFERENCE else self.files
        tables = []
        for target in files:
            table = read_table(target)
            table = table.filter(pc.equal(table["solver"], solver))
            tables.append(table.select([name for name in ["id", *columns] if name in table.column_names]))
        table = pa.concat_tables(tables)
        return table.take(pc.sort_indices(table["id"]))

    def kept(self, solver: int, count: int) -> np.ndarray:
        """Z1 of the first ``count`` ids of ``solver``, as (count, *shape) float32."""
        table = self.rows_of(solver, ["x1"]).slice(0, count)
        return column_array(table, "x1").astype(np.float32).reshape(count, *self.shape)


def _features(table: pa.Table, name: str) -> np.ndarray | None:
    return column_array(table, name) if name in table.column_names else None


def score(job: ScoreJob, solver: int) -> dict[str, float]:
    """The metrics of ``solver`` (or of the independent pairs, ``REFERENCE``)."""
    table = job.rows_of(
        solver,
        ["nfe", "straightness", "transport", "distance", "classifier", "classifier_logits", "inception", "logits"],
    )
    if len(table) != job.samples:
        raise ValueError(f"the block files hold {len(table)} samples of solver {solver}, expected {job.samples}")
    ids = np.arange(job.ot_samples)
    x0 = sample_by_id(job.pi0, job.seed, ids).numpy()
    x1 = job.kept(solver, job.ot_samples)
    row = {"transport_cost": float(np.mean(table["transport"].to_numpy())), **subset_coupling_metrics(x0, x1)}
    if solver == REFERENCE:
        return row
    reference = job.rows_of(REFERENCE, ["classifier", "inception"])
    row.update(vector_quality(x1, job.kept(REFERENCE, job.ot_samples)))
    classifier, inception = _features(table, "classifier"), _features(table, "inception")
    if classifier is not None:
        row.update(
            classifier_quality(classifier, _features(reference, "classifier"), _features(table, "classifier_logits"))
        )
    if inception is not None:
        row.update(
            inception_quality(
                inception,
                _features(table, "logits"),
                _features(reference, "inception"),
                with_precision_recall=classifier is None,
            )
        )
    nfe = table["nfe"].to_numpy()
    row.update(
        {
            "nfe_mean": float(nfe.mean()),
            "nfe_max": int(nfe.max()),
            "straightness": float(np.mean(table["straightness"].to_numpy())),
            "one_step_distance": float(np.mean(table["distance"].to_numpy())),
        }
    )
    return row


def figure_tables(job: ScoreJob, solvers: list[str], shown: int) -> tuple[pa.Table, pa.Table]:
    """(samples, trajectories) for the report: the first ``shown`` pairs (Z0, Z1) of every solver
    and of the independent pairs, and every kept path."""
    numel = math.prod(job.shape)
    ends = {INDEPENDENT: job.kept(REFERENCE, shown), **{name: job.kept(j, shown) for j, name in enumerate(solvers)}}
    start = sample_by_id(job.pi0, job.seed, np.arange(shown)).numpy().reshape(shown, -1)
    samples = pa.table(
        {
            "sampler": pa.array([name for name in ends for _ in range(shown)], pa.string()),
            "id": pa.array(np.tile(np.arange(shown, dtype=np.int64), len(ends))),
            "x0": vectors(np.concatenate([start] * len(ends))),
            "x1": vectors(np.concatenate([values.reshape(shown, -1) for values in ends.values()])),
        }
    )
    parts = []
    for j, name in enumerate(solvers):
        table = job.rows_of(j, ["path"])
        for sample, data in zip(table["id"].to_pylist(), table["path"].to_pylist()):
            if data is not None:
                parts.append((name, sample, path_rows(data, numel)))
    stacked = np.concatenate([np.zeros((0, 1 + numel), np.float32), *(path for _, _, path in parts)])
    trajectories = pa.table(
        {
            "sampler": pa.array([name for name, _, path in parts for _ in path], pa.string()),
            "id": pa.array([sample for _, sample, path in parts for _ in path], pa.int64()),
            "step": pa.array([step for _, _, path in parts for step in range(len(path))], pa.int64()),
            "t": pa.array(stacked[:, 0]),
            "x": vectors(stacked[:, 1:]),
        }
    )
    return samples, trajectories


score_task = ray.remote(num_cpus=1)(score)
figure_task = ray.remote(num_cpus=1)(figure_tables)


def scores(job: ScoreJob, solvers: list[int]) -> list[dict[str, Any]]:
    """The rows of ``solvers``, scored in parallel Ray tasks."""
    return ray.get([score_task.remote(job, solver) for solver in solvers])
