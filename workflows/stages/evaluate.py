"""The evaluation stage: what a model's samples cost and how good they are, per sampler, on Ray Data.

For one model (a k-RF, a distilled model or a VP / sub-VP baseline) and every configured sampler
(``euler@N``, ``heun@N``, ``rk45@TOL``), :func:`run_eval_stage` draws M samples and measures:

- **cost**: NFE per sample (mean and max; RK45 varies), and the worker seconds, CPU-seconds and
  GPU-seconds spent by that sampler;
- **the model's coupling** (Z0, Z1 = sampler(Z0)): straightness S = E_i Σ_k Δt_k ‖(Z1 − Z0) −
  ΔZ_k/Δt_k‖² of the sampler's own path (:func:`rf.metrics.straightness_per_sample`), transport
  cost E‖Z1 − Z0‖, pairing ratio = that cost ÷ the exact OT cost between {Z0} and {Z1} (≥ 1) and,
  for 2D data, the crossing rate of the segments [Z0_i, Z1_i];
- **quality** against π1 with the function of the data kind (:data:`QUALITY_METRICS`; vectors:
  exact W2 and MMD²), and the distance to a fine solve, E‖Z1 − Z1_ref‖ with Z1_ref from
  ``reference_solver`` (for ``euler@1`` this is the paper's one-step distance). For a distilled
  model Z1_ref is its teacher's fine solve: the coupling the distillation was meant to learn.

Exact OT, W2, MMD² and crossings use the first ``ot_samples`` ids (ids are i.i.d. draws, so that
is a uniform subsample); everything else uses all M.

Determinism: Z0_i = ``sample_by_id(pi0, seed, i)`` for i < M — the same for every model and
sampler, so rows are comparable — and π1's reference sample i is ``sample_by_id(pi1, seed + 1,
i)``. The network is evaluated in fixed-shape chunks (:class:`rf.coupling.FixedShapeVelocity`)
and RK45 controls its error per sample, so no number depends on block size or worker count.

Output (``output/``): ``metrics.parquet`` (one row per sampler, :data:`METRIC_COLUMNS`),
``samples.parquet`` (the first :data:`FIGURE_SAMPLES` (Z0, Z1) per sampler, plus the independent
pairs (Z0, X1 ~ π1) under the name :data:`INDEPENDENT`), ``trajectories.parquet`` (the first
``trajectories`` paths per sampler, one row per state), ``_PROGRESS.json`` while it runs, and
``_SUCCESS.json`` last. All Parquet, nothing pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.data import DataContext

from rf.coupling import FixedShapeVelocity
from rf.metrics import (
    crossing_rate,
    extract_features,
    fid,
    inception_score,
    kid,
    load_inception,
    mmd2,
    pairing_ratio,
    straightness_per_sample,
    transport_cost,
    wasserstein2,
)
from rf.metrics.distribution import frechet_distance_of_features, precision_recall
from rf.paths import make_path
from rf.solvers import Solver
from workflows.distributions import DistributionSpec, sample_by_id
from workflows.stage import (
    StageClock,
    code_version,
    finished_manifest,
    process_cpu_seconds,
    read_manifest,
    stage_hash,
    write_manifest,
    write_progress,
)
from workflows.stages.images import ClassifierSettings, load_classifier
from workflows.storage import Location, location
from workflows.weights import load_input_model, load_stage_model

KIND = "eval"
METRICS_FILE = "metrics.parquet"
SAMPLES_FILE = "samples.parquet"
TRAJECTORIES_FILE = "trajectories.parquet"
INDEPENDENT = "independent"
"""Sampler name of the independent pairs (Z0, X1 ~ π1) in ``samples.parquet``."""
FIGURE_SAMPLES = 500
"""(Z0, Z1) pairs kept per sampler for the report's figures (fewer for large images)."""
BLOCK_IDS = 256
"""Sample ids per Ray Data task."""
FORWARD_BATCH = 256
"""Rows of every network call (zero-padded), so results do not depend on the block size."""
MAX_TRAJECTORY_STATES = 101
TRAJECTORY_VALUES = 2**22
"""Stored trajectory values per sampler at most (images keep fewer states per path)."""

logger = logging.getLogger("rectiflow.evaluate")


class EvalError(ValueError):
    """Bad input for the evaluation stage: the model, the config or the output location."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalSettings(_Strict):
    """What a pipeline sets under ``evaluate:``: samplers, sample counts, seed, figures, resources."""

    samplers: list[str] = Field(
        default_factory=lambda: ["euler@1", "euler@2", "euler@5", "euler@100", "rk45@1e-5"], validate_default=True
    )
    samples: int = Field(2000, gt=1)
    ot_samples: int = Field(1000, gt=1)
    seed: int = Field(1234, ge=0, lt=2**63)
    reference_solver: str = Field("rk45@1e-5", validate_default=True)
    trajectories: int = Field(64, ge=0)
    classifier: ClassifierSettings | None = None
    """Images: train a small classifier on π1 once (a ``classifier`` stage) and measure the
    Fréchet distance and precision/recall of samples in its feature space."""
    inception: str | None = None
    """Images: URI of InceptionV3 weights (safetensors, or a .pth read without unpickling) for
    FID, IS and KID; nothing is downloaded."""
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)

    @field_validator("samplers")
    @classmethod
    def _samplers(cls, samplers: list[str]) -> list[str]:
        if not samplers:
            raise ValueError("list at least one sampler (e.g. euler@1)")
        names = [Solver.parse(text).name for text in samplers]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"samplers repeat {repeated} (after canonicalisation of {samplers})")
        return names

    @field_validator("reference_solver")
    @classmethod
    def _reference(cls, text: str) -> str:
        name = Solver.parse(text).name
        if name.startswith("sde@"):
            raise ValueError(f"{name}: the reference solve must be deterministic (euler, heun or rk45)")
        return name

    @model_validator(mode="after")
    def _counts(self) -> "EvalSettings":
        if self.ot_samples > self.samples:
            raise ValueError(f"ot_samples ({self.ot_samples}) must be <= samples ({self.samples})")
        if self.trajectories > self.samples:
            raise ValueError(f"trajectories ({self.trajectories}) must be <= samples ({self.samples})")
        return self


class EvalConfig(EvalSettings):
    """Settings of one evaluation stage: the settings plus π0 (where Z0 comes from) and π1 (the
    data the samples are compared with)."""

    pi0: DistributionSpec
    pi1: DistributionSpec

    @model_validator(mode="after")
    def _shapes(self) -> "EvalConfig":
        if list(self.pi0.shape) != list(self.pi1.shape):
            raise ValueError(f"pi0 has shape {list(self.pi0.shape)} but pi1 has shape {list(self.pi1.shape)}")
        stochastic = [name for name in self.samplers if name.startswith("sde@")]
        if stochastic and self.pi0.kind != "noise":
            raise ValueError(
                f"samplers {stochastic} need pi0 to be Gaussian noise (the SDE's score correction assumes "
                f"X0 ~ N(0, I)), but pi0 is of kind {self.pi0.kind}"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """Everything that decides the numbers (not the workers or their resources)."""
        return {
            **self.model_dump(mode="json", exclude={"workers", "cpus_per_worker", "gpus_per_worker"}),
            "pi0": self.pi0.identity(),
            "pi1": self.pi1.identity(),
        }

    @property
    def solvers(self) -> list[str]:
        """The samplers, then the reference solver when it is not one of them."""
        return [*self.samplers, *([] if self.reference_solver in self.samplers else [self.reference_solver])]


class EvalSubject(_Strict):
    """The model under evaluation as the report shows it."""

    name: str = Field(min_length=1)
    """Stage name of the model, e.g. ``train-2``, ``distill-2``, ``train-vp``."""
    label: str = Field(min_length=1)
    """What the report shows, e.g. ``2-RF``, ``2-RF distilled (k=1)``, ``VP ODE``."""
    family: Literal["rectified", "distilled", "baseline"]
    round: int | None = Field(None, ge=1)
    k: int | None = Field(None, ge=1)
    path: Literal["straight", "vp", "subvp"] = "straight"
    teacher: str | None = None
    """For a distilled model, the stage name of the flow it imitates: its reference solve then
    comes from that teacher, so the distance column measures how well the coupling was learnt."""

    @property
    def independent_pairs(self) -> bool:
        """Whether the model was trained on independent pairs (X0 ⫫ X1: a 1-RF or a baseline),
        the condition under which its velocity gives the score, −E[X0 | x]/β_t, that SDE samplers
        need. A reflow or distilled model's pairs are coupled, so its SDE rows would be wrong."""
        return self.family == "baseline" or (self.family == "rectified" and self.round == 1)


def eval_stage_hash(
    config: EvalConfig, subject: EvalSubject, model_hash: str, teacher_hash: str | None = None,
    classifier_hash: str | None = None,
) -> str:
    """The stage hash: the config's identity, the subject, the model's hash and, for a distilled
    model, its teacher's hash; for images measured by a classifier, its stage's hash."""
    inputs = {"model": model_hash, "teacher": teacher_hash or ""}
    if classifier_hash is not None:
        inputs["classifier"] = classifier_hash
    return stage_hash(KIND, {"config": config.identity(), "subject": subject.model_dump(mode="json")}, inputs)


# -- quality against π1, one function per data kind ---------------------------------------------

def vector_quality(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Exact W2 and unbiased MMD² (Gaussian kernels at the median distance) of two point sets
    (images: in pixel space, flattened)."""
    return {"w2": wasserstein2(samples.flatten(1), reference.flatten(1)), "mmd2": mmd2(samples.flatten(1), reference.flatten(1))}


@dataclasses.dataclass(frozen=True)
class FeatureQuality:
    """Image quality in the feature spaces available to the stage, on all M samples:

    - classifier features: Fréchet distance ``fd_classifier`` = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b −
      2(Σ_a Σ_b)^½) and k-NN precision/recall (k = 3);
    - InceptionV3 (pool3 features, logits): ``fid``, ``inception_score`` exp E KL(p(y|x) ‖ p(y))
      and ``kid`` (unbiased MMD² with the cubic kernel (x·y/d + 1)³); precision/recall in its
      space when there is no classifier."""

    classifier: torch.nn.Module | None = None
    inception: torch.nn.Module | None = None

    def against(self, reference: torch.Tensor) -> Callable[[torch.Tensor], dict[str, float]]:
        """A scorer of samples against ``reference``, whose features are computed here, once
        (not again for every sampler)."""
        b = fb = None
        if self.classifier is not None:
            with torch.inference_mode():
                b = self.classifier.features(reference)
        if self.inception is not None:
            fb, _ = extract_features(self.inception, reference)

        def score(samples: torch.Tensor) -> dict[str, float]:
            values: dict[str, float] = {}
            if self.classifier is not None:
                with torch.inference_mode():
                    a = self.classifier.features(samples)
                values["fd_classifier"] = frechet_distance_of_features(a, b)
                values["precision"], values["recall"] = precision_recall(b, a)
            if self.inception is not None:
                fa, logits = extract_features(self.inception, samples)
                values["fid"] = fid(fa, fb)
                values["inception_score"] = inception_score(logits)[0]
                values["kid"] = kid(fa, fb, subsets=10, subset_size=min(1000, len(fa)))[0]
                if self.classifier is None:
                    values["precision"], values["recall"] = precision_recall(fb, fa)
            return values

        return score


QUALITY_COLUMNS = ("w2", "mmd2", "fd_classifier", "precision", "recall", "fid", "inception_score", "kid")
"""Every column a quality function may fill, in the order the report shows them."""


def data_kind(shape: list[int]) -> str:
    """``images`` for examples of shape [C, H, W], ``vectors`` otherwise."""
    return "images" if len(shape) == 3 else "vectors"


METRIC_COLUMNS = (
    "model",
    "label",
    "family",
    "round",
    "k",
    "path",
    "sampler",
    "nfe_mean",
    "nfe_max",
    "straightness",
    "transport_cost",
    "pairing_ratio",
    "crossing_pct",
    *QUALITY_COLUMNS,
    "one_step_distance",
    "wall_seconds",
    "cpu_seconds",
    "gpu_seconds",
    "samples",
    "ot_samples",
    "seed",
    "model_hash",
)

# -- the work on the actors -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """Everything a sampling actor needs, sent once to each actor."""

    model: Location
    model_hash: str
    pi0: DistributionSpec
    path: str
    seed: int
    solvers: tuple[str, ...]
    trajectories: int
    trajectory_states: int
    cpus: float
    gpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


def own_states(times: torch.Tensor, states: torch.Tensor, limit: int) -> bytes:
    """One sample's path as float32 rows (t, Z_t…) in raw bytes: the states at which its time
    advanced (the start included), thinned to at most ``limit`` evenly spaced ones (first and
    last kept). :func:`path_rows` reads them back."""
    advanced = torch.cat([torch.ones(1, dtype=torch.bool), times[1:] > times[:-1]])
    rows = torch.cat([times[advanced, None].double(), states[advanced].double()], dim=1)
    if len(rows) > limit:
        rows = rows[np.unique(np.round(np.linspace(0, len(rows) - 1, limit)).astype(np.int64))]
    return rows.numpy().astype(np.float32).tobytes()


def path_rows(data: bytes, numel: int) -> np.ndarray:
    """The rows (t, Z_t…) that :func:`own_states` wrote, for examples of ``numel`` values."""
    return np.frombuffer(data, dtype=np.float32).reshape(-1, 1 + numel)


class Sampler:
    """The Ray Data UDF of the stage, one per actor: loads the model once, then solves each block
    of ids with one solver and returns a row per sample (Z1, NFE, straightness, its share of the
    block's seconds, and its path when its id is below ``trajectories``)."""

    def __init__(self, job: EvalJob):
        torch.set_num_threads(max(1, int(job.cpus)))
        model, manifest = load_stage_model(job.model)
        if manifest.get("hash") != job.model_hash:
            raise EvalError(
                f"model {job.model.uri} changed while the evaluation ran: hash {manifest.get('hash')}, "
                f"expected {job.model_hash}"
            )
        self._velocity = FixedShapeVelocity(model.to(job.device), FORWARD_BATCH)
        self._solvers = [Solver.parse(name) for name in job.solvers]
        self._path = make_path(job.path)
        self._job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [
            self.solve_block(int(solver), int(start), int(stop))
            for solver, start, stop in zip(batch["solver"], batch["start"], batch["stop"])
        ]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    @torch.inference_mode()
    def solve_block(self, solver: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows of ids [start, stop) solved with solver number ``solver``."""
        job = self._job
        wall, cpu = time.perf_counter(), time.process_time()
        ids = np.arange(start, stop, dtype=np.int64)
        x0 = sample_by_id(job.pi0, job.seed, ids).to(job.device)
        solution = self._solvers[solver].solve(
            self._velocity, x0, return_trajectory=True, path=self._path, seed=job.seed, ids=torch.from_numpy(ids)
        )
        trajectory = solution.trajectory
        straightness = straightness_per_sample(trajectory).cpu().numpy()
        kept = int(np.count_nonzero(ids < job.trajectories))  # ids are ascending: the first rows
        times = torch.stack([t[:kept].cpu() for t, _ in trajectory], dim=1)
        states = torch.stack([z[:kept].flatten(1).cpu() for _, z in trajectory], dim=1)
        paths = np.full(len(ids), b"", dtype=object)
        paths[:kept] = [own_states(times[row], states[row], job.trajectory_states) for row in range(kept)]
        rows = len(ids)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {
            "solver": np.full(rows, solver, dtype=np.int64),
            "id": ids,
            "x1": solution.x.flatten(1).cpu().numpy().astype(np.float32),
            "nfe": solution.nfe.cpu().numpy().astype(np.int64),
            "straightness": straightness,
            "wall_seconds": np.full(rows, wall / rows),
            "cpu_seconds": np.full(rows, cpu / rows),
            "gpu_seconds": np.full(rows, wall * job.gpus / rows),
            "path": paths,
        }


def _sample(job: EvalJob, samples: int, workers: int, output: Location) -> dict[str, dict[str, Any]]:
    """Run :class:`Sampler` on an actor pool over (solver, block of ids) items, solver-major; returns
    each solver's columns (see :func:`_columns`) and records in ``_PROGRESS.json`` the solvers
    finished. One block in flight per actor; a killed actor is restarted and its block redone
    (Ray Data's actor-pool defaults), which changes nothing since a block is a pure function."""
    items = [
        {"solver": j, "start": start, "stop": min(start + BLOCK_IDS, samples)}
        for j in range(len(job.solvers))
        for start in range(0, samples, BLOCK_IDS)
    ]
    DataContext.get_current().enable_progress_bars = False
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        Sampler,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(items)), max_tasks_in_flight_per_actor=1),
        num_cpus=job.cpus,
        num_gpus=job.gpus or None,
    )
    collected: dict[int, list[dict[str, Any]]] = {j: [] for j in range(len(job.solvers))}
    finished, started = 0, time.perf_counter()
    for row in rows.iter_rows():
        j = int(row["solver"])
        collected[j].append(row)
        if len(collected[j]) == samples:
            finished += 1
            logger.info(
                "evaluation %s: sampler %s done (%d/%d)", output.uri, job.solvers[j], finished, len(job.solvers)
            )
            write_progress(output, finished, len(job.solvers), "samplers", finished / (time.perf_counter() - started))
    numel = math.prod(job.pi0.shape)
    return {job.solvers[j]: _columns(found, numel) for j, found in collected.items()}


def _columns(rows: list[dict[str, Any]], numel: int) -> dict[str, Any]:
    """One solver's rows as columns in id order: x1 (M, numel), nfe, straightness, the summed
    seconds, and the kept paths (id, rows (t, Z_t…)) of the first ids."""
    rows = sorted(rows, key=lambda row: int(row["id"]))
    return {
        "x1": torch.from_numpy(np.stack([np.asarray(row["x1"], dtype=np.float32) for row in rows])),
        "nfe": np.array([int(row["nfe"]) for row in rows], dtype=np.int64),
        "straightness": np.array([float(row["straightness"]) for row in rows]),
        **{key: math.fsum(float(row[key]) for row in rows) for key in ("wall_seconds", "cpu_seconds", "gpu_seconds")},
        "paths": [(int(row["id"]), path_rows(row["path"], numel)) for row in rows if row["path"]],
    }


# -- the numbers ----------------------------------------------------------------------------------


def coupling_metrics(x0: torch.Tensor, x1: torch.Tensor, ot_samples: int) -> dict[str, float]:
    """Transport cost E‖x1 − x0‖ over all pairs; pairing ratio and crossing % (2D only, NaN
    otherwise) over the first ``ot_samples``."""
    sub0, sub1 = x0[:ot_samples], x1[:ot_samples]
    planar = list(x0.shape[1:]) == [2]
    return {
        "transport_cost": transport_cost(x0, x1),
        "pairing_ratio": pairing_ratio(sub0, sub1),
        "crossing_pct": 100.0 * crossing_rate(sub0, sub1) if planar else math.nan,
    }


def _metric_row(
    config: EvalConfig,
    subject: EvalSubject,
    model_hash: str,
    sampler: str,
    x0: torch.Tensor,
    reference: torch.Tensor,
    fine: torch.Tensor,
    results: dict[str, dict[str, Any]],
    features: Callable[[torch.Tensor], dict[str, float]],
) -> dict[str, Any]:
    """The ``metrics.parquet`` row of one sampler; ``fine`` is the reference solve of the same Z0
    (the model's own, or its teacher's for a distilled model)."""
    result = results[sampler]
    x1 = result["x1"].reshape(x0.shape)
    sub = config.ot_samples
    quality = {**vector_quality(x1[:sub], reference[:sub]), **features(x1)}
    distance = torch.linalg.vector_norm((x1.double() - fine.double()).flatten(1), dim=1).mean()
    return {
        "model": subject.name,
        "label": subject.label,
        "family": subject.family,
        "round": subject.round,
        "k": subject.k,
        "path": subject.path,
        "sampler": sampler,
        "nfe_mean": float(result["nfe"].mean()),
        "nfe_max": int(result["nfe"].max()),
        "straightness": float(result["straightness"].mean()),
        **coupling_metrics(x0, x1, sub),
        **{column: quality.get(column, math.nan) for column in QUALITY_COLUMNS},
        "one_step_distance": float(distance),
        "wall_seconds": result["wall_seconds"],
        "cpu_seconds": result["cpu_seconds"],
        "gpu_seconds": result["gpu_seconds"],
        "samples": config.samples,
        "ot_samples": sub,
        "seed": config.seed,
        "model_hash": model_hash,
    }


_STRING_COLUMNS = {"model", "label", "family", "path", "sampler", "model_hash"}
_INT_COLUMNS = {"round", "k", "nfe_max", "samples", "ot_samples", "seed"}
METRICS_SCHEMA = pa.schema(
    [
        (name, pa.string() if name in _STRING_COLUMNS else pa.int64() if name in _INT_COLUMNS else pa.float64())
        for name in METRIC_COLUMNS
    ]
)


def _vectors(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _samples_table(x0: torch.Tensor, reference: torch.Tensor, results: dict[str, dict[str, Any]]) -> pa.Table:
    """The first :data:`FIGURE_SAMPLES` pairs (Z0, Z1) of every solver and the independent pairs
    (Z0, X1 ~ π1), one row per (sampler, id)."""
    n = min(FIGURE_SAMPLES, len(x0), max(16, TRAJECTORY_VALUES // x0[0].numel()))
    ends = {INDEPENDENT: reference.flatten(1), **{name: result["x1"] for name, result in results.items()}}
    names = list(ends)
    start = x0[:n].flatten(1).numpy()
    return pa.table(
        {
            "sampler": pa.array([name for name in names for _ in range(n)], pa.string()),
            "id": pa.array(np.tile(np.arange(n, dtype=np.int64), len(names))),
            "x0": _vectors(np.concatenate([start] * len(names))),
            "x1": _vectors(np.concatenate([ends[name][:n].numpy() for name in names])),
        }
    )


def _trajectories_table(results: dict[str, dict[str, Any]], numel: int) -> pa.Table:
    """The kept paths, one row per (sampler, id, step) with its time t and state x."""
    parts = [(name, sample, path) for name, result in results.items() for sample, path in result["paths"]]
    stacked = np.concatenate([np.zeros((0, 1 + numel), np.float32), *(path for _, _, path in parts)])
    return pa.table(
        {
            "sampler": pa.array([name for name, _, path in parts for _ in path], pa.string()),
            "id": pa.array([sample for _, sample, path in parts for _ in path], pa.int64()),
            "step": pa.array([step for _, _, path in parts for step in range(len(path))], pa.int64()),
            "t": pa.array(stacked[:, 0]),
            "x": _vectors(stacked[:, 1:]),
        }
    )


def table_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet bytes (zstd)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_table(target: Location) -> pa.Table:
    """A Parquet object (never unpickled: Parquet only)."""
    try:
        return pq.read_table(pa.BufferReader(target.read_bytes()))
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{target.uri} is not a readable Parquet file: {error}") from None


def json_safe(value: Any) -> Any:
    """``value`` with NaN floats as None (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


# -- the stage ------------------------------------------------------------------------------------


def _trajectory_states(config: EvalConfig) -> int:
    """States kept per path: at most :data:`MAX_TRAJECTORY_STATES`, fewer for large examples so
    that one sampler keeps at most :data:`TRAJECTORY_VALUES` values."""
    values = max(1, config.trajectories) * math.prod(config.pi0.shape)
    return max(2, min(MAX_TRAJECTORY_STATES, TRAJECTORY_VALUES // values))


def _classifier_hash(classifier: Location | None) -> str | None:
    return read_manifest(classifier)["hash"] if classifier is not None else None


def _feature_quality(config: EvalConfig, classifier: Location | None) -> tuple[FeatureQuality, dict[str, Any]]:
    """The feature extractors of an image evaluation and their provenance (file hashes)."""
    if data_kind(list(config.pi1.shape)) != "images":
        return FeatureQuality(), {}
    provenance: dict[str, Any] = {}
    net = None
    if classifier is not None:
        net, digest = load_classifier(classifier)
        provenance["classifier"] = {"uri": classifier.uri, "sha256": digest}
    inception = None
    if config.inception is not None:
        weights = location(config.inception)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / (Path(weights.path).name or "inception.safetensors")
            try:
                data = weights.read_bytes()
            except FileNotFoundError:
                raise EvalError(f"evaluate.inception: {weights.uri} does not exist") from None
            local.write_bytes(data)
            inception = load_inception(str(local))
            provenance["inception"] = {"uri": weights.uri, "sha256": hashlib.sha256(data).hexdigest()}
    return FeatureQuality(net, inception), provenance


def run_eval_stage(
    config: EvalConfig, subject: EvalSubject, model: Location, output: Location, teacher: Location | None = None,
    classifier: Location | None = None,
) -> dict[str, Any]:
    """Evaluate the finished training stage ``model`` with every sampler of ``config`` into
    ``output`` (see the module docstring); returns the manifest. For a distilled model,
    ``teacher`` is the flow it imitates: the reference solve is the teacher's. For images,
    ``classifier`` is a finished classifier stage whose features measure quality.

    Returns a finished output's manifest without loading the model; otherwise validates
    everything before writing anything."""
    config, subject = EvalConfig.model_validate(config), EvalSubject.model_validate(subject)
    expected = {"identity": config.identity(), "subject": subject.model_dump(mode="json")}
    finished = finished_manifest(output, KIND, "evaluation", expected, EvalError)
    if finished is not None:
        logger.info("evaluation %s is finished; nothing to do", output.uri)
        return finished
    clock, driver_cpu = StageClock(), process_cpu_seconds()
    _, model_hash = load_input_model(model, "model", config.pi0.shape, EvalError)
    features, feature_provenance = _feature_quality(config, classifier)
    skipped = [] if subject.independent_pairs else [name for name in config.solvers if name.startswith("sde@")]
    solvers = [name for name in config.solvers if name not in skipped]
    samplers = [name for name in config.samplers if name not in skipped]
    if skipped:
        logger.info("evaluation %s: no SDE rows for %s (trained on coupled pairs): %s", output.uri, subject.label, skipped)
    teacher_hash = load_input_model(teacher, "teacher", config.pi0.shape, EvalError)[1] if teacher else None
    job = EvalJob(
        model,
        model_hash,
        config.pi0,
        subject.path,
        config.seed,
        tuple(solvers),
        config.trajectories,
        _trajectory_states(config),
        config.cpus_per_worker,
        config.gpus_per_worker,
    )
    logger.info(
        "evaluating %s (%s): %d samples with %s on %d worker(s)",
        model.uri,
        subject.label,
        config.samples,
        ", ".join(solvers),
        config.workers,
    )
    results = _sample(job, config.samples, config.workers, output)
    references = results
    if teacher is not None:
        teacher_job = dataclasses.replace(
            job, model=teacher, model_hash=teacher_hash, solvers=(config.reference_solver,), trajectories=0
        )
        references = _sample(teacher_job, config.samples, config.workers, output)
    ids = np.arange(config.samples)
    x0 = sample_by_id(config.pi0, config.seed, ids)
    reference = sample_by_id(config.pi1, config.seed + 1, ids)
    fine = references[config.reference_solver]["x1"].reshape(x0.shape)
    score = features.against(reference)
    rows = [
        _metric_row(config, subject, model_hash, name, x0, reference, fine, results, score) for name in samplers
    ]
    files = {
        METRICS_FILE: table_bytes(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)),
        SAMPLES_FILE: table_bytes(_samples_table(x0, reference, results)),
        TRAJECTORIES_FILE: table_bytes(_trajectories_table(results, math.prod(config.pi0.shape))),
    }
    for name, data in files.items():
        output.join(name).write_bytes(data)
    for result in results.values():
        clock.add_worker(result["cpu_seconds"], result["gpu_seconds"])
    clock.add_worker(process_cpu_seconds() - driver_cpu)
    manifest = {
        "kind": KIND,
        "stage": output.name,
        "hash": eval_stage_hash(config, subject, model_hash, teacher_hash, _classifier_hash(classifier)),
        "config": config.model_dump(mode="json"),
        "identity": config.identity(),
        "subject": subject.model_dump(mode="json"),
        "inputs": {
            "model": {"uri": model.uri, "hash": model_hash},
            **({"teacher": {"uri": teacher.uri, "hash": teacher_hash}} if teacher else {}),
        },
        "features": feature_provenance,
        "data_kind": data_kind(list(config.pi0.shape)),
        "solvers": solvers,
        "skipped_samplers": {
            name: "the model was trained on coupled pairs: its velocity does not give the score an SDE needs"
            for name in skipped
        },
        "rows": json_safe(rows),
        "independent": json_safe(coupling_metrics(x0, reference, config.ot_samples)),
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
        },
        "time": clock.summary(),
        "code": code_version(),
    }
    write_manifest(output, manifest)
    return manifest
