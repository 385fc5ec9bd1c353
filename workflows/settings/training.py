"""What a training stage trains and how: the model, the path, time and loss, optimisation and
resources (``train:`` of a pipeline file, one ``TrainConfig`` per training stage)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rf.options.losses import LPIPS_LOSSES, check_loss
from rf.options.models import model_options
from rf.options.timesteps import time_sampler_options
from workflows.settings.base import Strict, neutral
from workflows.settings.data import PairSource
from workflows.storage import StorageError, location

PathName = Literal["straight", "vp", "subvp", "vp_const"]


class ModelSpec(Strict):
    """A velocity network: ``kind`` (mlp, unet) and its constructor ``config``."""

    kind: Literal["mlp", "unet"]
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> ModelSpec:
        model_options(self.kind, self.config)
        return self

    @property
    def input_shape(self) -> list[int]:
        """The shape of one example the network takes."""
        return model_options(self.kind, self.config).input_shape


class Choice(Strict):
    """A named component with keyword options: a time sampler (uniform, logit_normal, u_shaped,
    grid)."""

    name: str
    options: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> Choice:
        time_sampler_options(self.name, **self.options)
        return self


class LossChoice(Strict):
    """The training loss: ``name`` (l2, pseudo_huber, lpips, lpips_huber), keyword ``options``,
    and for the LPIPS losses ``weights``, the URI of the LPIPS network's safetensors file (read
    through the storage layer; nothing is downloaded from the internet)."""

    name: str = "l2"
    options: dict[str, float] = Field(default_factory=dict)
    weights: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> LossChoice:
        object.__setattr__(self, "name", check_loss(self.name, self.options, self.weights))
        if self.weights is not None:
            try:
                object.__setattr__(self, "weights", location(self.weights).uri)
            except StorageError as error:
                raise ValueError(f"weights: {error}") from None
        return self

    @property
    def is_lpips(self) -> bool:
        return self.name in LPIPS_LOSSES


class InputSettings(Strict):
    """How a training stage reads its pairs (``train.input``; the algorithm is in
    :mod:`workflows.shard_windows` and :mod:`workflows.pair_stream`).

    Each train worker (rank) has its own stream, read by ``readers`` read actors that share
    ``cpus`` CPUs (each reserves cpus / readers and decodes the shards of its window with that many
    threads); they deliver blocks into at most ``buffer_mb`` of Ray's object store, from which the
    worker prefetches ``prefetch_batches`` batches. ``window_mb`` is the shuffle window: a reader
    permutes the rows of k whole shards together, k = ⌊window_mb / decoded MB of the largest
    shard⌋ (at least 1). It decides the order of the examples, so it decides the result; the
    other settings change only speed and memory (a rank's stream holds about
    readers × window_mb + buffer_mb + the prefetched batches). Two readers let one window decode
    while the previous one is consumed; with one, keep ``buffer_mb`` ≥ ``window_mb``."""

    cpus: float = neutral(1.0, gt=0)
    readers: int = neutral(1, ge=1)
    window_mb: int = Field(256, gt=0)
    buffer_mb: int = neutral(512, gt=0)
    prefetch_batches: int = neutral(2, ge=1)


class TrainSettings(Strict):
    """How to train: optimisation, loss, length, resources (what a pipeline sets per round).

    ``batch_size`` is the global batch of one optimizer step; each of the ``workers`` runs
    ``grad_accumulation`` micro-batches of ``batch_size / (workers · grad_accumulation)``.
    ``compile`` wraps the network in ``torch.compile`` (it decides the bits, so it counts).
    ``cpus_per_worker`` are the train worker's own (the step's host work); decoding has its own
    CPUs in ``input``."""

    steps: int = Field(2000, gt=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    loss: LossChoice = LossChoice()
    grad_accumulation: int = Field(1, ge=1)
    channels_last: bool = False
    compile: bool = False
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = neutral(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    checkpoint_every: int = neutral(500, gt=0)
    max_failures: int = neutral(2, ge=-1)
    log_every: int = neutral(100, gt=0)
    input: InputSettings = InputSettings()

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainSettings:
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
    """One training stage: what to train (``model``, or the warm start's architecture when None),
    on which ``path`` with which ``time_sampler`` and ``seed``, from which ``data``."""

    model: ModelSpec | None = None
    path: PathName = "straight"
    time_sampler: Choice = Choice(name="uniform")
    seed: int = Field(0, ge=0)
    data: PairSource

    @model_validator(mode="after")
    def _lpips_on_straight_path(self) -> TrainConfig:
        if self.loss.is_lpips and self.path != "straight":
            raise ValueError(
                f"loss {self.loss.name} compares the endpoints x_t + (1 − t)·v, which are X1 only on the "
                f"straight path; path is {self.path}"
            )
        return self
