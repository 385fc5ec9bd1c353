"""The per-worker loop of the training stage (runs inside Ray Train, one process per rank).

Each rank reads its own deterministic stream (:mod:`workflows.pair_stream`) and completes its
batches on its device (noise X0 drawn there by pair id, uint8 pixels scaled); t comes from
counter-based uniforms keyed by the example index and dropout is reseeded per (step, rank), so the
RNG state is a function of the step and a resumed run repeats an uninterrupted one. Every
``checkpoint_every`` steps rank 0 reports a checkpoint (model, EMA, optimizer, step) with the
stage's running totals, and appends the training metrics logged since the last checkpoint to
``metrics/steps-{first}-{last}.parquet`` in the stage's attempt folder. A NaN/inf loss or batch
stops the stage with the step and the pair ids of the batch; the last good checkpoint stays. Rank
0 looks at the stage's lease every heartbeat interval and stops when another run took it over.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.train
import torch
from ray.train import Checkpoint

from rf.checkpoint import restore_trainer, tensors_from_bytes, trainer_to_files
from rf.models import build_model
from rf.noise import STREAMS, uniform
from rf.paths import make_path
from rf.timesteps import make_time_sampler
from rf.training import NonFiniteLossError, VelocityTrainer
from workflows.lease import Fence, FenceWatch
from workflows.pair_stream import rank_batches
from workflows.settings import TrainConfig
from workflows.shard_format import parquet_bytes
from workflows.stage import write_progress
from workflows.stages.losses import build_loss
from workflows.storage import Location

logger = logging.getLogger("rectiflow.train")

NONFINITE_DIR = "nonfinite"
METRICS_DIR = "metrics"
STAGE_STATE = "stage.json"


def time_seed(config: TrainConfig) -> int:
    """The seed of the training times t (X0 and X1 have theirs in the data source)."""
    return config.seed


def read_checkpoint_files(checkpoint: Checkpoint) -> dict[str, bytes]:
    with checkpoint.as_directory() as directory:
        return {path.name: path.read_bytes() for path in Path(directory).iterdir() if path.is_file()}


def _record_nonfinite(attempt: Location, rank: int, error: NonFiniteLossError, batch: dict[str, torch.Tensor]) -> None:
    """Write which step and which pairs of this rank's batch were not finite."""
    finite = torch.isfinite(batch["x0"]).flatten(1).all(1) & torch.isfinite(batch["x1"]).flatten(1).all(1)
    bad = batch["pair_id"][~finite.cpu()].tolist()
    attempt.join(NONFINITE_DIR, f"rank{rank}.json").write_json(
        {"step": error.step, "detail": error.detail, "bad_pair_ids": bad[:10]}
    )


def nonfinite_report(attempt: Location) -> str | None:
    """One line from the ranks' non-finite records, or None when training did not stop."""
    folder = attempt.join(NONFINITE_DIR)
    records = [folder.join(name).read_json() for name in folder.list_names()]
    if not records:
        return None
    bad = sorted({pair for record in records for pair in record["bad_pair_ids"]})
    where = f" (non-finite pairs: {', '.join(map(str, bad))})" if bad else ""
    return f"stopped at step {records[0]['step']}: {records[0]['detail']}{where}"


class _MetricsLog:
    """Rank 0's log rows (step, loss, lr, steps/s, examples/s) since the last checkpoint, written
    as one small Parquet file per checkpoint: appended, never overwritten."""

    def __init__(self, attempt: Location):
        self.folder = attempt.join(METRICS_DIR)
        self.rows: list[dict[str, float]] = []

    def add(self, **row: float) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if not self.rows:
            return
        first, last = int(self.rows[0]["step"]), int(self.rows[-1]["step"])
        table = pa.Table.from_pylist(self.rows)
        self.folder.join(f"steps-{first:08d}-{last:08d}.parquet").write_bytes(parquet_bytes(table, ["step"]))
        self.rows = []


def train_worker(loop: dict[str, Any]) -> None:
    """The loop of one rank; ``loop`` holds the config, the stage's output and attempt folders,
    the model spec, the warm-start weights and the fence (see :func:`workflows.stages.train.run`)."""
    config: TrainConfig = loop["config"]
    attempt: Location = loop["attempt"]
    fence: Fence | None = loop["fence"]
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
        compile=config.compile,
    )
    totals: dict[str, Any] = {"cpu_seconds": 0.0, "gpu_seconds": 0.0, "examples": 0, "resumed_at": []}
    checkpoint = ray.train.get_checkpoint() or loop["resume"]
    if checkpoint is not None:
        files = read_checkpoint_files(checkpoint)
        restore_trainer(trainer, files, "checkpoint")
        totals.update(json.loads(files[STAGE_STATE]))
        totals["resumed_at"] = [*totals["resumed_at"], trainer.step_count]
        if rank == 0:
            logger.info("resumed from the checkpoint of step %d", trainer.step_count)
    sampler = make_time_sampler(config.time_sampler.name, **config.time_sampler.options)
    t_max = make_path(config.path).t_max
    rank_batch = config.batch_size // world
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    examples_at_start, last_log = totals["examples"], (time.perf_counter(), trainer.step_count)
    watch, metrics = FenceWatch(fence if rank == 0 else None), _MetricsLog(attempt)
    loss = torch.full((), float("nan"))

    def save(step: int) -> None:
        elapsed = time.perf_counter() - wall_start
        cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(cpu)
        state = {
            "cpu_seconds": totals["cpu_seconds"] + float(cpu),
            "gpu_seconds": totals["gpu_seconds"] + elapsed * world * config.gpus_per_worker,
            "examples": totals["examples"],
            "resumed_at": totals["resumed_at"],
        }
        reported = {"step": step, "loss": float(loss)}
        if rank != 0:
            ray.train.report(reported)
            return
        metrics.flush()
        with tempfile.TemporaryDirectory() as directory:
            for name, data in trainer_to_files(trainer).items():
                Path(directory, name).write_bytes(data)
            Path(directory, STAGE_STATE).write_text(json.dumps(state))
            ray.train.report(
                reported, checkpoint=Checkpoint.from_directory(directory), checkpoint_dir_name=f"step-{step:08d}"
            )

    stream, source = ray.train.get_dataset_shard(f"rank{rank}"), loop["source"]
    batches = rank_batches(
        stream,
        batch_size=rank_batch,
        device=device,
        pin_memory=device.type == "cuda",
        prefetch_batches=config.input.prefetch_batches,
    )
    for batch in batches:
        step = int(batch["step"][0])
        if step < trainer.step_count:
            continue  # the stream started before the restored checkpoint
        if step > trainer.step_count:
            raise RuntimeError(f"rank {rank}: data stream is at step {step}, training at {trainer.step_count}")
        watch.check()
        examples = batch["example"].cpu().numpy()
        t = sampler.from_uniform(uniform(time_seed(config), examples, stream=STREAMS.time), t_max).to(device)
        torch.manual_seed((config.seed * 1_000_003 + step) * 4099 + rank)
        x0, x1 = source.model_pairs(batch, device)  # noise drawn here, on the device, by pair id
        try:
            loss = trainer.step(x0, x1, t)
        except NonFiniteLossError as error:
            _record_nonfinite(attempt, rank, error, {"pair_id": batch["pair_id"], "x0": x0, "x1": x1})
            return
        totals["examples"] += config.batch_size
        done = trainer.step_count
        if rank == 0 and (done % config.log_every == 0 or done == config.steps):
            now = time.perf_counter()
            steps_per_second = (done - last_log[1]) / max(now - last_log[0], 1e-9)
            last_log = (now, done)
            rate = (totals["examples"] - examples_at_start) / max(now - wall_start, 1e-9)
            value = float(loss)
            logger.info("step %d/%d  loss %.5f  %.1f examples/s", done, config.steps, value, rate)
            metrics.add(
                step=done,
                loss=value,
                lr=trainer.learning_rate(done - 1),
                steps_per_second=steps_per_second,
                examples_per_second=rate,
            )
            write_progress(loop["output"], done, config.steps, "steps", steps_per_second, loss=value)
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
