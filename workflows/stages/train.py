"""The training stage: 1-RF, reflow and distillation in one loop on Ray Train.

They differ only in where (X0, X1) come from — independent draws of π0 and π1, or the shards of
a coupling stage — and in how t is drawn (continuous for flows, the k-grid for distillation).

``run_train_stage(config, output, data, init)``:

1. returns the manifest at once when ``output`` already has ``_SUCCESS.json``;
2. validates everything (model vs data shapes, coupling shards, warm-start weights) before
   anything is written;
3. runs a ``TorchTrainer`` (DDP: gloo on CPU, NCCL on GPU, bf16 autocast on GPU) whose Ray Train
   run lives in ``output/ray`` — a re-run resumes from its latest checkpoint, a worker failure
   restarts from it (``FailureConfig``);
4. writes the final EMA weights to ``output/model`` and the manifest last.

Each worker reads its own deterministic stream (:mod:`workflows.pair_stream`); t comes from
counter-based uniforms keyed by the example index and dropout is reseeded per (step, rank), so
the RNG state is a function of the step and a resumed run repeats an uninterrupted one.
A NaN/inf loss or batch stops the stage with the step and the pair ids of the batch; the last
good checkpoint stays.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import ray.train
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.data import DataContext, ExecutionResources
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rf.checkpoint import EMA_FILE, SPEC_FILE, model_from_files, restore_trainer, tensors_from_bytes, trainer_to_files
from rf.losses import LPIPS_LOSSES, check_loss, make_loss
from rf.models import build_model, input_shape, model_spec
from rf.noise import uniform
from rf.paths import make_path
from rf.timesteps import make_time_sampler
from rf.training import NonFiniteLossError, VelocityTrainer
from workflows.pair_stream import CouplingSource, IndependentSource, OnlineSource, StreamPlan, rank_datasets
from workflows.shards import Coupling
from workflows.stage import (
    StageClock,
    code_version,
    content_hash,
    is_done,
    process_cpu_seconds,
    read_manifest,
    stage_hash,
    write_manifest,
    write_progress,
)
from workflows.storage import Location, StorageError, location
from workflows.weights import load_stage_model, write_model

logger = logging.getLogger("rectiflow.train")

RAY_DIR = "ray"
RAY_RUN_NAME = "train"
NONFINITE_DIR = "nonfinite"
STREAM_TIME = 3


class StageInputError(ValueError):
    """The stage's inputs do not fit together (shapes, shards, workers)."""


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss or batch."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A velocity network: ``kind`` (mlp, unet) and its constructor ``config``."""

    kind: Literal["mlp", "unet"]
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> "ModelSpec":
        build_model(self.kind, self.config)
        return self


class Choice(_Strict):
    """A named component with keyword options (time sampler, loss)."""

    name: str
    options: dict[str, float] = Field(default_factory=dict)


class LossChoice(Choice):
    """The training loss: ``name`` (l2, pseudo_huber, lpips, lpips_huber), keyword ``options``,
    and for the LPIPS losses ``weights``, the URI of the LPIPS network's safetensors file (read
    through the storage layer; nothing is downloaded from the internet)."""

    weights: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> "LossChoice":
        canonical = check_loss(self.name, self.options, self.weights)
        object.__setattr__(self, "name", canonical)
        if self.weights is not None:
            try:
                object.__setattr__(self, "weights", location(self.weights).uri)
            except StorageError as error:
                raise ValueError(f"weights: {error}") from None
        return self

    @property
    def is_lpips(self) -> bool:
        return self.name in LPIPS_LOSSES


def checked_time_sampler(choice: Choice) -> Choice:
    """``choice`` when it names a buildable time sampler (else the sampler's ValueError)."""
    make_time_sampler(choice.name, **choice.options)
    return choice


class TrainSettings(_Strict):
    """How to train: optimisation, loss, length, resources (what a pipeline sets per round)."""

    steps: int = Field(2000, gt=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    loss: LossChoice = LossChoice(name="l2")
    grad_accumulation: int = Field(1, ge=1)
    channels_last: bool = False
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    checkpoint_every: int = Field(500, gt=0)
    max_failures: int = Field(2, ge=-1)
    log_every: int = Field(100, gt=0)
    data_buffer_mb: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainSettings":
        split = self.workers * self.grad_accumulation
        if self.batch_size % split:
            if self.grad_accumulation == 1:
                raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of workers ({self.workers})")
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of workers × grad_accumulation "
                f"({self.workers} × {self.grad_accumulation} = {split}): batch_size is the global batch of one "
                f"optimizer step, each worker runs grad_accumulation micro-batches of batch_size / {split}"
            )
        return self

    @property
    def micro_batch(self) -> int:
        """Examples per forward/backward pass on one worker."""
        return self.batch_size // (self.workers * self.grad_accumulation)


class TrainConfig(TrainSettings):
    """Settings of one training stage: what to train (model, path, time sampler, seed) and how.
    ``identity()`` is what its result depends on."""

    model: ModelSpec | None = None
    path: Literal["straight", "vp", "subvp"] = "straight"
    time_sampler: Choice = Choice(name="uniform")
    seed: int = Field(0, ge=0)

    @field_validator("time_sampler")
    @classmethod
    def _time_sampler(cls, choice: Choice) -> Choice:
        return checked_time_sampler(choice)

    @model_validator(mode="after")
    def _lpips_on_straight_path(self) -> "TrainConfig":
        if self.loss.is_lpips and self.path != "straight":
            raise ValueError(
                f"loss {self.loss.name} compares the endpoints x_t + (1 − t)·v, which are X1 only on the "
                f"straight path; path is {self.path}"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """Fields that decide the trained weights (not checkpointing, retries or logging). Options
        added later are left out at their defaults, so older stage hashes stay valid."""
        identity = self.model_dump(
            mode="json", exclude={"cpus_per_worker", "checkpoint_every", "max_failures", "log_every", "data_buffer_mb"}
        )
        for key, default in _NEW_DEFAULTS.items():
            if identity[key] == default:
                del identity[key]
        if identity["loss"]["weights"] is None:
            del identity["loss"]["weights"]
        return identity


_NEW_DEFAULTS: dict[str, Any] = {"grad_accumulation": 1, "channels_last": False}


def _data_seeds(seed: int) -> tuple[int, int, int]:
    """Seeds of X0, X1 and t derived from the stage seed."""
    return 2 * seed + 1, 2 * seed + 2, seed


# -- the worker ---------------------------------------------------------------------------------


def _read_checkpoint_files(checkpoint: Checkpoint) -> dict[str, bytes]:
    with checkpoint.as_directory() as directory:
        return {path.name: path.read_bytes() for path in Path(directory).iterdir() if path.is_file()}


def _record_nonfinite(output: Location, rank: int, error: NonFiniteLossError, batch: dict[str, torch.Tensor]) -> None:
    """Write which step and which pairs of this rank's batch were not finite."""
    finite = torch.isfinite(batch["x0"]).flatten(1).all(1) & torch.isfinite(batch["x1"]).flatten(1).all(1)
    bad = batch["pair_id"][~finite.cpu()].tolist()
    output.join(NONFINITE_DIR, f"rank{rank}.json").write_json(
        {"step": error.step, "detail": error.detail, "bad_pair_ids": bad[:10]}
    )


def _nonfinite_report(output: Location) -> str | None:
    """One line from the ranks' non-finite records, or None when training did not stop."""
    folder = output.join(NONFINITE_DIR)
    records = [folder.join(name).read_json() for name in folder.list_names()]
    if not records:
        return None
    bad = sorted({pair for record in records for pair in record["bad_pair_ids"]})
    where = f" (non-finite pairs: {', '.join(map(str, bad))})" if bad else ""
    return f"stopped at step {records[0]['step']}: {records[0]['detail']}{where}"


def build_loss(choice: LossChoice) -> Any:
    """The loss of ``choice``; LPIPS weights are read from their URI through the storage layer
    (StageInputError naming ``loss.weights`` when missing or unusable)."""
    if not choice.is_lpips:
        return make_loss(choice.name, **choice.options)
    weights = location(choice.weights)
    try:
        data = weights.read_bytes()
    except (FileNotFoundError, StorageError, OSError) as error:
        raise StageInputError(f"loss.weights: cannot read the LPIPS weights at {weights.uri}: {error}") from None
    suffix = Path(weights.path).suffix or ".safetensors"
    with tempfile.TemporaryDirectory() as directory:
        local = Path(directory, f"lpips{suffix}")
        local.write_bytes(data)
        try:
            return make_loss(choice.name, weights=local, **choice.options)
        except (ValueError, FileNotFoundError) as error:
            message = str(error).replace(str(local), weights.uri)
            raise StageInputError(f"loss.weights: {message}") from None


def _train_worker(loop: dict[str, Any]) -> None:
    """The per-worker loop (runs inside Ray Train)."""
    config: TrainConfig = loop["config"]
    output: Location = loop["output"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    device = ray.train.torch.get_device()
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")

    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
    model = build_model(**loop["model_spec"])
    if loop["init_weights"] is not None:
        model.load_state_dict(tensors_from_bytes(loop["init_weights"], "warm-start weights"))
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # before DDP wraps it: its buckets follow the layout
    forward_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    loss_fn = build_loss(config.loss)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.to(device)
    trainer = VelocityTrainer(
        model,
        make_path(config.path),
        loss=loss_fn,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        grad_clip=config.grad_clip,
        ema_decay=config.ema_decay,
        forward_model=forward_model,
        autocast_dtype=torch.bfloat16 if use_bf16 else None,
        grad_accumulation=config.grad_accumulation,
        channels_last=config.channels_last,
    )
    totals: dict[str, Any] = {"cpu_seconds": 0.0, "gpu_seconds": 0.0, "examples": 0, "resumed_at": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        files = _read_checkpoint_files(checkpoint)
        restore_trainer(trainer, files, "checkpoint")
        totals.update(json.loads(files["stage.json"]))
        totals["resumed_at"] = [*totals["resumed_at"], trainer.step_count]
        if rank == 0:
            logger.info("resumed from the checkpoint of step %d", trainer.step_count)
    sampler = make_time_sampler(config.time_sampler.name, **config.time_sampler.options)
    t_max = make_path(config.path).t_max
    _, _, time_seed = _data_seeds(config.seed)
    rank_batch = config.batch_size // world
    cpu_start, wall_start = process_cpu_seconds(), time.perf_counter()
    examples_at_start = totals["examples"]
    loss = float("nan")

    def save(step: int) -> None:
        elapsed = time.perf_counter() - wall_start
        cpu = torch.tensor([process_cpu_seconds() - cpu_start], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(cpu)
        state = {
            "cpu_seconds": totals["cpu_seconds"] + float(cpu),
            "gpu_seconds": totals["gpu_seconds"] + elapsed * world * config.gpus_per_worker,
            "examples": totals["examples"],
            "resumed_at": totals["resumed_at"],
        }
        metrics = {"step": step, "loss": loss}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            for name, data in trainer_to_files(trainer).items():
                Path(directory, name).write_bytes(data)
            Path(directory, "stage.json").write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory), checkpoint_dir_name=f"step-{step:08d}")

    stream = ray.train.get_dataset_shard(f"rank{rank}")
    for batch in stream.iter_torch_batches(batch_size=rank_batch, device=device):
        step = int(batch["step"][0])
        if step < trainer.step_count:
            continue  # the stream started before the restored checkpoint
        if step > trainer.step_count:
            raise RuntimeError(f"rank {rank}: data stream is at step {step}, training at {trainer.step_count}")
        examples = batch["example"].cpu().numpy()
        t = sampler.from_uniform(uniform(time_seed, examples, stream=STREAM_TIME), t_max).to(device)
        torch.manual_seed((config.seed * 1_000_003 + step) * 4099 + rank)
        try:
            loss = trainer.step(batch["x0"].float(), batch["x1"].float(), t)
        except NonFiniteLossError as error:
            _record_nonfinite(output, rank, error, batch)
            return
        totals["examples"] += config.batch_size
        done = trainer.step_count
        if rank == 0 and (done % config.log_every == 0 or done == config.steps):
            now = time.perf_counter()
            rate = (totals["examples"] - examples_at_start) / max(now - wall_start, 1e-9)
            logger.info("step %d/%d  loss %.5f  %.1f examples/s", done, config.steps, loss, rate)
            write_progress(output, done, config.steps, "steps", rate / config.batch_size, loss=loss)
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)


# -- the driver ---------------------------------------------------------------------------------


def _resolve_model(config: TrainConfig, init: Location | None) -> tuple[dict[str, Any], bytes | None, str | None]:
    """(model spec, warm-start weights or None, warm-start stage hash or None)."""
    configured = None if config.model is None else model_spec(build_model(config.model.kind, config.model.config))
    if init is None:
        if configured is None:
            raise StageInputError("the training config has no model and there is no stage to warm-start from")
        return configured, None, None
    model, manifest = load_stage_model(init)
    spec = model_spec(model)
    if configured is not None and configured != spec:
        raise StageInputError(f"model {configured} differs from the warm-start model {spec} of {init.uri}")
    weights = init.join(manifest.get("model", "model"), "model.safetensors").read_bytes()
    return spec, weights, manifest.get("hash")


Data = IndependentSource | OnlineSource | Location
"""Where a training stage's pairs come from: independent draws, an online teacher, or the
location of a finished coupling stage."""


def _source(data: Data, config: TrainConfig) -> IndependentSource | OnlineSource | CouplingSource:
    if isinstance(data, OnlineSource):
        load_stage_model(data.teacher)  # finished and loadable, before anything starts
        return data
    if isinstance(data, IndependentSource):
        return data
    coupling = Coupling.open(data)
    if len(coupling.shards) < config.workers:
        raise StageInputError(
            f"coupling {data.uri} has {len(coupling.shards)} shards for {config.workers} train workers; "
            "every worker needs at least one shard"
        )
    return CouplingSource(coupling, _data_seeds(config.seed)[0])


def independent_identity(source: IndependentSource) -> dict[str, Any]:
    """What independent pairs are, for hashes and manifests."""
    return {
        "pi0": source.pi0.identity(),
        "pi1": source.pi1.identity(),
        "seed0": source.seed0,
        "seed1": source.seed1,
    }


def online_identity(source: OnlineSource, teacher_hash: str) -> dict[str, Any]:
    """What online reflow pairs are, for hashes and manifests."""
    return {
        "pi0": source.pi0.identity(),
        "seed": source.seed,
        "solver": source.solver,
        "forward_batch": source.forward_batch,
        "teacher": teacher_hash,
    }


def train_stage_hash(config: TrainConfig, data_hash: str, init_hash: str | None) -> str:
    """The stage hash: config identity, the data's hash (a coupling stage's hash, or the hash
    of the independent pairs' identity) and the warm-start stage's hash."""
    return stage_hash("train", config.identity(), {"data": data_hash, "init": init_hash or ""})


def run_train_stage(
    config: TrainConfig,
    output: Location,
    data: Data,
    init: Location | None = None,
) -> dict[str, Any]:
    """Train (or resume, or return the finished result of) one velocity field; returns the manifest."""
    if is_done(output):
        return read_manifest(output)
    spec, init_weights, init_hash = _resolve_model(config, init)
    source = _source(data, config)
    model_shape = input_shape(build_model(**spec))
    if list(source.shape) != model_shape:
        raise StageInputError(f"the data has examples of shape {source.shape} but the model takes {model_shape}")
    if config.loss.is_lpips:
        if len(model_shape) != 3:
            raise StageInputError(f"loss {config.loss.name} compares images; the examples have shape {model_shape}")
        build_loss(config.loss)  # the weights exist and fit, before anything is written or trained

    clock = StageClock()
    output.join(NONFINITE_DIR).delete()
    ray_run = output.join(RAY_DIR, RAY_RUN_NAME)
    plan = StreamPlan(source, config.workers, config.batch_size // config.workers, config.steps, ray_run)
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {})}
    DataContext.get_current().enable_progress_bars = False
    execution = DataConfig.default_ingest_options()
    execution.preserve_order = True
    # Streamed, not loaded: each rank's pipeline holds at most this much data in flight.
    execution.resource_limits = ExecutionResources.for_limits(object_store_memory=config.data_buffer_mb * 2**20)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": config,
            "output": output,
            "model_spec": spec,
            "init_weights": init_weights,
        },
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=output.join(RAY_DIR).path,
            storage_filesystem=output.arrow_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=rank_datasets(plan),
        dataset_config=DataConfig(datasets_to_split=[], execution_options=execution),
    )
    logger.info("training %s: %d steps, batch %d on %d worker(s)", output.uri, config.steps, config.batch_size, config.workers)
    result = trainer.fit()

    stopped = _nonfinite_report(output)
    if stopped:
        raise TrainingStopped(f"training {output.uri} {stopped}; the last good checkpoint is kept")
    if result.checkpoint is None or int(result.metrics.get("step", -1)) != config.steps:
        raise RuntimeError(f"training {output.uri} ended before step {config.steps} without an error from Ray")
    files = _read_checkpoint_files(result.checkpoint)
    ema = model_from_files(files[EMA_FILE], files[SPEC_FILE], "final checkpoint")
    write_model(output, ema)
    stage_state = json.loads(files["stage.json"])
    clock.add_worker(stage_state["cpu_seconds"], stage_state["gpu_seconds"])
    if isinstance(source, CouplingSource):
        data_inputs = {"coupling": source.coupling.location.uri, "hash": source.coupling.hash}
    elif isinstance(source, OnlineSource):
        teacher_hash = read_manifest(source.teacher)["hash"]
        identity = online_identity(source, teacher_hash)
        data_inputs = {"online": {**identity, "teacher_uri": source.teacher.uri}, "hash": content_hash(identity)}
    else:
        data_inputs = {"independent": independent_identity(source), "hash": content_hash(independent_identity(source))}
    manifest = {
        "stage": output.name,
        "kind": "train",
        "hash": train_stage_hash(config, data_inputs["hash"], init_hash),
        "config": config.model_dump(mode="json"),
        "inputs": {"data": data_inputs, "init": {"uri": init.uri, "hash": init_hash} if init else None},
        "model": "model",
        "model_spec": spec,
        "steps": int(result.metrics["step"]),
        "final_loss": float(result.metrics["loss"]),
        "examples_seen": int(stage_state["examples"]),
        "resumed_at_steps": stage_state["resumed_at"],
        "time": clock.summary(),
        "code": code_version(),
    }
    write_manifest(output, manifest)
    return manifest
