"""The evaluation stage: what a model's samples cost and how good they are, per sampler, on Ray.

For one model (a k-RF, a distilled model or a baseline) and every configured sampler (``euler@N``,
``heun@N``, ``rk45@TOL``, ``sde@N``), ``run(config, inputs, output)`` draws M samples and measures

- **cost**: NFE per sample (mean and max; RK45 varies) and the worker, CPU and GPU seconds spent;
- **the model's coupling** (Z0, Z1 = sampler(Z0)): straightness, transport cost E‖Z1 − Z0‖,
  pairing ratio (÷ the exact OT cost, ≥ 1) and, for 2D data, the crossing rate;
- **quality** against π1 — vectors: exact W2 and MMD²; images: Fréchet distance and
  precision/recall in the classifier's features, FID / IS / KID with InceptionV3 weights — and
  the distance to a fine solve E‖Z1 − Z1_ref‖ (for ``euler@1`` the paper's one-step distance;
  for a distilled model Z1_ref is its teacher's fine solve, the coupling it was meant to learn).

Exact OT, W2, MMD² and crossings use the first ``ot_samples`` ids (ids are i.i.d. draws, so that
is a uniform subsample); everything else uses all M.

**The driver does no work that grows with M.** Workers (:mod:`workflows.stages.eval_worker`)
sample blocks of ids and write per-sample values, features and the kept Z1 as block files in the
attempt folder; Ray tasks (:mod:`workflows.stages.eval_scores`) reduce them to one row per
sampler and the report's small tables. The driver plans blocks, gathers per-block seconds and
writes ``metrics.parquet``, ``samples.parquet``, ``trajectories.parquet`` and the manifest.

Determinism: Z0_i = ``sample_by_id(pi0, seed, i)`` — the same for every model and sampler, so rows
are comparable — and π1's reference sample i is ``sample_by_id(pi1, seed + 1, i)``. The network
runs in fixed-shape chunks of ``forward_batch`` rows (``evaluate.forward_batch``, or the largest
batch whose activations fit ``evaluate.memory_budget_mb``, at most 256) and RK45 controls its
error per sample, so no number depends on the block size or worker count.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Any

import pyarrow as pa
import ray

from rf.memory import inference_batch
from workflows.actor_pool import run_on_actors
from workflows.eval_files import (
    METRICS_FILE,
    METRICS_SCHEMA,
    QUALITY_COLUMNS,
    SAMPLES_FILE,
    TRAJECTORIES_FILE,
    json_safe,
    table_bytes,
)
from workflows.manifest import Manifest
from workflows.settings import EvalConfig
from workflows.stage import StageContext, run_stage
from workflows.stages.eval_scores import REFERENCE, ScoreJob, figure_task, scores
from workflows.stages.eval_worker import BLOCKS_DIR, EvalError, EvalJob, EvalWorker
from workflows.storage import Location, location
from workflows.weights import load_input_model

KIND = "eval"
FIGURE_SAMPLES = 500
"""(Z0, Z1) pairs kept per sampler for the report's figures (fewer for large images)."""
MAX_TRAJECTORY_STATES = 101
TRAJECTORY_VALUES = 2**22
"""Stored trajectory values per sampler at most (images keep fewer states per path)."""

logger = logging.getLogger("rectiflow.evaluate")


def _trajectory_states(config: EvalConfig) -> int:
    """States kept per path: at most :data:`MAX_TRAJECTORY_STATES`, fewer for large examples so
    that one sampler keeps at most :data:`TRAJECTORY_VALUES` values."""
    values = max(1, config.trajectories) * math.prod(config.pi0.shape)
    return max(2, min(MAX_TRAJECTORY_STATES, TRAJECTORY_VALUES // values))


def figure_count(config: EvalConfig) -> int:
    """Samples per sampler in ``samples.parquet``."""
    return min(FIGURE_SAMPLES, config.samples, max(16, TRAJECTORY_VALUES // math.prod(config.pi0.shape)))


def _blocks(samples: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, samples)) for start in range(0, samples, size)]


def _evaluate(config: EvalConfig, context: StageContext) -> dict[str, Any]:
    subject, inputs = config.subject, context.inputs
    model, model_hash = load_input_model(inputs["model"], "model", config.pi0.shape, EvalError)
    teacher = inputs.get("teacher")
    teacher_hash = load_input_model(teacher, "teacher", config.pi0.shape, EvalError)[1] if teacher else None
    skipped = [] if subject.independent_pairs else [name for name in config.solvers if name.startswith("sde@")]
    if skipped:
        logger.info(
            "evaluation %s: no SDE rows for %s (trained on coupled pairs): %s",
            context.output.uri,
            subject.label,
            skipped,
        )
    solvers = [name for name in config.solvers if name not in skipped]
    samplers = [name for name in config.samplers if name not in skipped]
    budget = config.memory_budget_mb * 2**20
    forward_batch = config.forward_batch or inference_batch(model, config.pi0.shape, budget)
    shown = figure_count(config)
    provenance = _feature_provenance(config, context)  # the weights exist, before any sampling
    job = EvalJob(
        model=inputs["model"],
        model_hash=model_hash,
        teacher=teacher,
        teacher_hash=teacher_hash,
        classifier=inputs.get("classifier"),
        inception=config.inception,
        pi0=config.pi0,
        pi1=config.pi1,
        path=subject.path,
        seed=config.seed,
        solvers=tuple(solvers),
        reference_solver=config.reference_solver,
        keep=max(config.ot_samples, shown),
        trajectories=config.trajectories,
        trajectory_states=_trajectory_states(config),
        forward_batch=forward_batch,
        precision=config.precision,
        attempt=context.attempt,
        cpus=config.cpus_per_worker,
        gpus=config.gpus_per_worker,
    )
    blocks = _blocks(config.samples, forward_batch)
    items = [{"part": part, "start": start, "stop": stop} for part in ("model", "reference") for start, stop in blocks]
    logger.info(
        "evaluating %s (%s): %d samples with %s in %d blocks of %d on %d worker(s)",
        inputs["model"].uri,
        subject.label,
        config.samples,
        ", ".join(solvers),
        len(blocks),
        forward_batch,
        config.workers,
    )
    seconds = {j: {"wall_seconds": 0.0, "cpu_seconds": 0.0, "gpu_seconds": 0.0} for j in range(len(solvers))}
    done, started = 0, time.perf_counter()
    for report in run_on_actors(EvalWorker, job, items, config.workers, config.cpus_per_worker, config.gpus_per_worker):
        context.clock.add_worker(report["cpu_seconds"], report["gpu_seconds"])
        if report["solver"] != REFERENCE:
            for key in seconds[report["solver"]]:
                seconds[report["solver"]][key] += report[key]
            done += 1
            if done % len(solvers) == 0:
                context.progress(
                    done // len(solvers),
                    len(blocks),
                    "blocks",
                    done / len(solvers) / max(time.perf_counter() - started, 1e-9),
                )
        context.check_lease()
    files = tuple(job.block_file("model", start) for start, _ in blocks)
    score_job = ScoreJob(
        files,
        tuple(job.block_file("reference", start) for start, _ in blocks),
        config.pi0,
        config.seed,
        config.samples,
        config.ot_samples,
        tuple(config.pi0.shape),
    )
    sampler_numbers = [solvers.index(name) for name in samplers]
    figures = figure_task.remote(score_job, solvers, shown)
    *scored, independent = scores(score_job, [*sampler_numbers, REFERENCE])
    samples_table, trajectories_table = ray.get(figures)
    rows = [
        {
            "model": subject.name,
            "label": subject.label,
            "family": subject.family,
            "round": subject.round,
            "k": subject.k,
            "path": subject.path,
            "sampler": name,
            **dict.fromkeys(QUALITY_COLUMNS, math.nan),
            **row,
            **seconds[j],
            "samples": config.samples,
            "ot_samples": config.ot_samples,
            "seed": config.seed,
            "model_hash": model_hash,
        }
        for name, j, row in zip(samplers, sampler_numbers, scored)
    ]
    tables = {
        METRICS_FILE: pa.Table.from_pylist(rows, schema=METRICS_SCHEMA),
        SAMPLES_FILE: samples_table,
        TRAJECTORIES_FILE: trajectories_table,
    }
    written = {}
    for name, table in tables.items():
        data = table_bytes(table)
        context.attempt.join(name).write_bytes(data)
        written[name] = {
            "path": context.relative(context.attempt.join(name)),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    return {
        "summary": f"{subject.label}: {config.samples} samples with {', '.join(samplers)}; "
        f"reference {config.reference_solver}",
        "subject": subject.model_dump(mode="json"),
        "model_hash": model_hash,
        "features": provenance,
        "data_kind": "images" if len(config.pi0.shape) == 3 else "vectors",
        "solvers": solvers,
        "forward_batch": forward_batch,
        "blocks": context.relative(context.attempt.join(BLOCKS_DIR)),
        "skipped_samplers": {
            name: "the model was trained on coupled pairs: its velocity does not give the score an SDE needs"
            for name in skipped
        },
        "rows": json_safe(rows),
        "independent": json_safe(independent),
        "files": written,
    }


def _feature_provenance(config: EvalConfig, context: StageContext) -> dict[str, Any]:
    """Which feature extractors measured the images: the classifier stage (and its hash), the
    InceptionV3 weights (and their sha256)."""
    provenance: dict[str, Any] = {}
    if "classifier" in context.inputs:
        provenance["classifier"] = {
            "uri": context.inputs["classifier"].uri,
            "hash": context.manifests["classifier"].hash,
        }
    if config.inception is not None:
        weights = location(config.inception)
        try:
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        except FileNotFoundError:
            raise EvalError(f"evaluate.inception: {weights.uri} does not exist") from None
        provenance["inception"] = {"uri": weights.uri, "sha256": digest}
    return provenance


def run(config: EvalConfig, inputs: dict[str, Location], output: Location) -> Manifest:
    """Evaluate the finished training stage ``inputs["model"]`` with every sampler of ``config``
    into ``output`` (see the module docstring); for a distilled model ``inputs["teacher"]`` is
    the flow it imitates, for images ``inputs["classifier"]`` a finished classifier stage."""
    config = EvalConfig.model_validate(config)
    if "model" not in inputs:
        raise EvalError(f"an evaluation needs a 'model' input; it has {sorted(inputs)}")
    return run_stage(KIND, config, inputs, output, lambda context: _evaluate(config, context), EvalError)
