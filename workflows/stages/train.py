"""The training stage: 1-RF, reflow and distillation in one loop on Ray Train.

They differ only in where (X0, X1) come from — ``config.data``: independent draws of π0 and π1,
online solves of a ``teacher`` input, or the shards of a ``coupling`` input — and in how t is drawn
(continuous for flows, the k-grid for distillation). ``run(config, inputs, output) → Manifest``:

1. returns the manifest at once when ``output`` is finished (the shared helper,
   :func:`workflows.stage.run_stage`);
2. validates everything (model vs data shapes, coupling shards — in parallel worker tasks — and
   warm-start weights) before anything is written;
3. runs a ``TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU) whose Ray Train run lives in the
   stage's attempt folder ``attempt-{lease generation}/ray``. A worker failure restarts from its
   latest checkpoint (``FailureConfig``); a new attempt (a re-run after the driver died, or a run
   that took the lease over) resumes from the latest checkpoint of the earlier attempts;
4. writes the final EMA weights to ``attempt-{generation}/model`` and the manifest last.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.data import ExecutionResources
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rf.checkpoint import EMA_FILE, SPEC_FILE, model_from_files
from rf.models import build_model, input_shape, model_spec
from workflows.couplings import Coupling
from workflows.lease import ATTEMPT, attempt_folder
from workflows.manifest import Manifest
from workflows.pair_stream import CouplingSource, IndependentSource, OnlineSource, StreamPlan, rank_datasets
from workflows.settings import CoupledPairs, IndependentPairs, OnlinePairs, TrainConfig
from workflows.stage import StageContext, StageInputError, run_stage
from workflows.stages.losses import build_loss
from workflows.stages.train_loop import STAGE_STATE, nonfinite_report, read_checkpoint_files, train_worker
from workflows.storage import Location
from workflows.weights import load_stage_model, model_folder, write_model

logger = logging.getLogger("rectiflow.train")

KIND = "train"
RAY_DIR = "ray"
RAY_RUN_NAME = "train"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss or batch."""


def _warm_start(config: TrainConfig, init: Location | None) -> tuple[dict[str, Any], bytes | None]:
    """(model spec, warm-start weights or None)."""
    configured = None if config.model is None else model_spec(build_model(config.model.kind, config.model.config))
    if init is None:
        if configured is None:
            raise StageInputError("the training config has no model and there is no stage to warm-start from")
        return configured, None
    model, manifest = load_stage_model(init)
    spec = model_spec(model)
    if configured is not None and configured != spec:
        raise StageInputError(f"model {configured} differs from the warm-start model {spec} of {init.uri}")
    return spec, model_folder(init, manifest).join("model.safetensors").read_bytes()


def data_seed(config: TrainConfig) -> int:
    """The seed of the coupling stream's shard order (derived from the stage seed)."""
    return 2 * config.seed + 1


def pair_source(config: TrainConfig, inputs: dict[str, Location]) -> IndependentSource | OnlineSource | CouplingSource:
    """The runtime source of ``config.data`` with its inputs, checked before anything is written:
    manifests read (an image import's, a coupling's), coupling shards verified, and a shard for
    every train worker when the pairs are streamed from shards."""
    data = config.data
    if isinstance(data, OnlinePairs):
        teacher = _input(inputs, "teacher", "online pairs")
        load_stage_model(teacher)  # finished and loadable, before anything starts
        return OnlineSource(teacher, data.pi0, data.seed, data.solver, data.forward_batch)
    if isinstance(data, IndependentPairs):
        source = IndependentSource.open(data)
    else:
        assert isinstance(data, CoupledPairs)
        source = CouplingSource(Coupling.open(_input(inputs, "coupling", "coupled pairs")), data_seed(config))
    if source.shards is not None and len(source.shards.rows) < config.workers:
        coupled = isinstance(source, CouplingSource)
        what = f"coupling {source.coupling.location.uri}" if coupled else f"images {data.pi1.uri}"
        raise StageInputError(
            f"{what} has {len(source.shards.rows)} shards for {config.workers} train workers; every worker needs at "
            "least one shard (use a smaller shard size)"
        )
    if isinstance(source, CouplingSource):
        source.coupling.verify()  # in parallel worker tasks: a corrupt shard fails the stage before its first step
    return source


def _input(inputs: dict[str, Location], role: str, what: str) -> Location:
    if role not in inputs:
        raise StageInputError(f"{what} need a {role!r} input; the stage has {sorted(inputs)}")
    return inputs[role]


def resume_checkpoint(output: Location, generation: int) -> tuple[Checkpoint, int] | None:
    """(checkpoint, step) of the latest checkpoint an earlier attempt reported, or None."""
    earlier = sorted((int(m.group(1)) for m in map(ATTEMPT.match, output.list_names()) if m), reverse=True)
    for number in (n for n in earlier if n < generation):
        run = output.join(attempt_folder(number), RAY_DIR, RAY_RUN_NAME)
        try:
            latest = json.loads(run.join(RAY_SNAPSHOT).read_bytes())["latest_checkpoint_result"]
            step = int(latest["metrics"]["step"])
            path = latest["checkpoint_dir_name"]
        except (FileNotFoundError, KeyError, TypeError, ValueError):
            continue
        return Checkpoint(run.join(path).path, output.arrow_fs), step
    return None


def _train(config: TrainConfig, context: StageContext) -> dict[str, Any]:
    output, attempt = context.output, context.attempt
    spec, init_weights = _warm_start(config, context.inputs.get("init"))
    source = pair_source(config, context.inputs)
    model_shape = input_shape(build_model(**spec))
    if list(source.shape) != model_shape:
        raise StageInputError(f"the data has examples of shape {source.shape} but the model takes {model_shape}")
    if config.loss.is_lpips:
        if len(model_shape) != 3:
            raise StageInputError(f"loss {config.loss.name} compares images; the examples have shape {model_shape}")
        build_loss(config.loss)  # the weights exist and fit, before anything is written or trained
    generation = context.lease.generation if context.lease is not None else 0
    resume = resume_checkpoint(output, generation)
    ray_run = attempt.join(RAY_DIR, RAY_RUN_NAME)
    plan = StreamPlan(
        source,
        config.workers,
        config.batch_size // config.workers,
        config.steps,
        ray_run,
        resume[1] if resume else 0,
        config.input,
    )
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {})}
    execution = DataConfig.default_ingest_options()
    execution.preserve_order = True
    # Streamed, not loaded: each rank's pipeline holds at most this much data in flight.
    execution.resource_limits = ExecutionResources.for_limits(object_store_memory=config.input.buffer_mb * 2**20)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config,
            "output": output,
            "attempt": attempt,
            "model_spec": spec,
            "init_weights": init_weights,
            "fence": context.lease.fence() if context.lease is not None else None,
            "source": source,
            # an earlier attempt's checkpoint (Train V2 has no resume_from_checkpoint); Ray's own
            # restarts within this attempt restore from ray.train.get_checkpoint() instead
            "resume": resume[0] if resume else None,
        },
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=attempt.join(RAY_DIR).path,
            storage_filesystem=output.arrow_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=rank_datasets(plan),
        dataset_config=DataConfig(datasets_to_split=[], execution_options=execution),
    )
    logger.info(
        "training %s: %d steps, batch %d on %d worker(s)%s",
        output.uri,
        config.steps,
        config.batch_size,
        config.workers,
        f", resuming at step {resume[1]}" if resume else "",
    )
    result = trainer.fit()
    stopped = nonfinite_report(attempt)
    if stopped:
        raise TrainingStopped(f"training {output.uri} {stopped}; the last good checkpoint is kept")
    if result.checkpoint is None or int(result.metrics.get("step", -1)) != config.steps:
        raise RuntimeError(f"training {output.uri} ended before step {config.steps} without an error from Ray")
    files = read_checkpoint_files(result.checkpoint)
    ema = model_from_files(files[EMA_FILE], files[SPEC_FILE], "final checkpoint")
    folder = write_model(attempt.join("model"), ema)
    state = json.loads(files[STAGE_STATE])
    context.clock.add_worker(state["cpu_seconds"], state["gpu_seconds"])
    final_loss = float(result.metrics["loss"])
    return {
        "summary": f"{config.steps} steps on {config.data.kind} pairs, {config.path} path, final loss {final_loss:.4g}",
        "model": context.relative(folder),
        "model_spec": spec,
        "steps": int(result.metrics["step"]),
        "final_loss": final_loss,
        "examples_seen": int(state["examples"]),
        "resumed_at_steps": state["resumed_at"],
        "metrics": context.relative(attempt.join("metrics")),
    }


def run(config: TrainConfig, inputs: dict[str, Location], output: Location) -> Manifest:
    """Train (or resume, or return the finished result of) one velocity field; returns the manifest."""
    config = TrainConfig.model_validate(config)
    return run_stage(KIND, config, inputs, output, lambda context: _train(config, context))
