"""The paper's image configs (configs/cifar10.yaml and the 256² ones): each validates as shipped,
and each builds and trains a few steps at a tiny size on generated images through the real image
import and π1 sampling; CIFAR-10 (2 DDP workers) and one 256² config through the training stage
on local Ray, the other 256² configs (same architecture) in process."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rf.models import build_model
from rf.paths import make_path
from rf.training import VelocityTrainer
from workflows.config import load_pipeline
from workflows.distributions import sample_by_id
from workflows.images import import_images
from workflows.manifest import SUCCESS_FILE
from workflows.settings import ImagesSpec, IndependentPairs, NoiseSpec, TrainConfig
from workflows.stage import StageInputError
from workflows.stages import train as train_stage
from workflows.storage import location
from workflows.weights import load_stage_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER = {"cifar10": 32, "celebahq256": 256, "lsun_church256": 256, "lsun_bedroom256": 256, "afhq_cat256": 256}


def _tiny(uri: str, workers: int = 1) -> list[str]:
    """``--set`` overrides that keep a paper config's architecture family and number of levels
    but shrink the widths, the steps and the resources to a CPU test: each of ``workers`` DDP
    workers runs 2 micro-batches of 2 examples per step."""
    return [
        f"pi1.uri={uri}",
        "model.config.base_channels=8",
        "model.config.num_res_blocks=1",
        "train.steps=3",
        f"train.batch_size={4 * workers}",
        "train.grad_accumulation=2",
        f"train.workers={workers}",
        "train.gpus_per_worker=0",
        "train.cpus_per_worker=1",
        "train.warmup_steps=1",
        "train.checkpoint_every=3",
        "train.input.buffer_mb=64",
    ]


def _random_images(tmp_path: Path, resolution: int, count: int = 8) -> str:
    """``count`` random RGB images imported as a dataset in shards of 2 (a shard for every train
    worker of the tests); returns its URI."""
    array = np.random.default_rng(resolution).integers(0, 256, (count, resolution, resolution, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=array)
    destination = str(tmp_path / f"images{resolution}")
    import_images(
        str(tmp_path / "images.npz"), destination, resolution=resolution, channels=3, shard_size=2, parallel=False
    )
    return destination


def _first_round(config) -> TrainConfig:
    """The first training stage's config, as the pipeline builds it (its data: independent pairs)."""
    settings = config.round_settings(1)
    data = IndependentPairs(pi0=config.pi0, pi1=config.pi1, seed0=1, seed1=2)
    return TrainConfig(
        model=config.model,
        path=config.path,
        time_sampler=config.time_sampler,
        seed=config.seed,
        data=data,
        **settings.model_dump(),
    )


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_validates_as_shipped(name, tmp_path):
    config = load_pipeline(CONFIGS / f"{name}.yaml", storage=str(tmp_path))
    resolution = PAPER[name]
    assert isinstance(config.pi0, NoiseSpec) and isinstance(config.pi1, ImagesSpec)
    assert config.pi1.shape == [3, resolution, resolution] and config.pi1.uri.startswith("s3://YOUR-BUCKET/")
    assert config.model.kind == "unet" and config.model.config["base_channels"] == 128
    assert config.model.config["attn_resolutions"] == [16]
    assert config.train.gpus_per_worker == 1 and config.train.channels_last
    assert config.couple is not None and config.couple.solver == "rk45@1e-05"
    for distill in config.distill:
        loss = config.distill_settings(distill).loss
        assert loss.name == "lpips" and loss.weights.startswith("s3://YOUR-BUCKET/")
    if name == "cifar10":
        assert config.model.config["channel_mult"] == [1, 2, 2, 2] and config.model.config["num_res_blocks"] == 4
        assert config.train.batch_size == 128 and config.train.ema_decay == 0.999999
        assert config.couple.pairs == 4_000_000
    else:
        assert (
            config.model.config["channel_mult"] == [1, 1, 2, 2, 2, 2, 2] and config.model.config["num_res_blocks"] == 2
        )
        assert config.train.workers == 4 and config.train.batch_size == 64 and config.train.micro_batch == 16
        assert config.train.input.cpus == 2 and config.train.input.readers == 2 and config.train.input.window_mb == 1024


THROUGH_RAY = ("cifar10", "celebahq256")
"""Trained through the Ray Train stage; the other 256² configs share celebahq256's architecture and
run their steps in process (the stage machinery is the same for all of them)."""


@pytest.mark.parametrize("name", sorted(set(PAPER) - set(THROUGH_RAY)))
def test_paper_config_builds_and_steps_in_process(name, tmp_path):
    images = _random_images(tmp_path, PAPER[name])
    config = load_pipeline(CONFIGS / f"{name}.yaml", overrides=_tiny(images), storage=str(tmp_path / "runs"))
    train = _first_round(config)
    data = train.data
    model = build_model(config.model.kind, config.model.config)
    trainer = VelocityTrainer(
        model,
        make_path(train.path),
        lr=train.lr,
        warmup_steps=train.warmup_steps,
        ema_decay=train.ema_decay,
        grad_accumulation=train.grad_accumulation,
        channels_last=train.channels_last,
    )
    ids = np.arange(train.batch_size)
    for step in range(train.steps):
        x0, x1 = (sample_by_id(spec, seed, ids + step * len(ids)) for spec, seed in ((data.pi0, 1), (data.pi1, 2)))
        loss = trainer.step(x0, x1, torch.rand(len(ids)))
        assert np.isfinite(loss)
    assert x1.shape == (train.batch_size, 3, PAPER[name], PAPER[name]) and -1 <= x1.min() and x1.max() <= 1
    assert model.config()["channel_mult"] == config.model.config["channel_mult"]


@pytest.mark.parametrize("name", THROUGH_RAY)
def test_paper_config_trains_a_few_steps_at_a_tiny_size(name, ray_session, tmp_path):
    images = _random_images(tmp_path, PAPER[name])
    workers = 2 if name == "cifar10" else 1  # DDP with no_sync() on the first micro-batch
    config = load_pipeline(CONFIGS / f"{name}.yaml", overrides=_tiny(images, workers), storage=str(tmp_path / "runs"))
    train = _first_round(config)
    assert train.micro_batch == 2 and train.channels_last and train.workers == workers
    output = location(str(tmp_path / "runs")).join(config.name, "train-1")
    details = train_stage.run(train, {}, output).details
    assert details["steps"] == 3 and details["examples_seen"] == 3 * 4 * workers
    assert np.isfinite(details["final_loss"])
    model, _ = load_stage_model(output)
    assert model.config()["channel_mult"] == config.model.config["channel_mult"]
    assert model.config()["resolution"] == PAPER[name]


def _lpips_weights() -> dict:
    import torch

    from rf.lpips import LPIPS

    torch.manual_seed(0)
    state = {k: v for k, v in LPIPS().state_dict().items() if k not in ("shift", "scale")}
    return {
        k: (torch.rand(v.shape) + 0.1 if k.startswith("lin") else torch.randn(v.shape) * 0.05) for k, v in state.items()
    }


def test_lpips_distillation_reads_its_weights_from_storage_and_trains(ray_session, s3_bucket, tmp_path):
    """CIFAR-10's distillation loss (LPIPS on the endpoints x_t + (1 − t)·v) with weights on S3."""
    save_file(_lpips_weights(), str(tmp_path / "lpips.safetensors"))
    weights = f"{s3_bucket}/weights/lpips_vgg.safetensors"
    location(weights).write_bytes((tmp_path / "lpips.safetensors").read_bytes())
    images = _random_images(tmp_path, 32)
    overrides = [*_tiny(images), f"distill.0.train.loss.weights={weights}", "distill.0.train.loss.options.resize=0"]
    config = load_pipeline(CONFIGS / "cifar10.yaml", overrides=overrides, storage=str(tmp_path / "runs"))
    settings = config.distill_settings(config.distill[0])
    data = IndependentPairs(pi0=config.pi0, pi1=config.pi1, seed0=1, seed1=2)
    train = TrainConfig(
        model=config.model,
        time_sampler={"name": "grid", "options": {"k": 1}},
        seed=1,
        data=data,
        **{**settings.model_dump(), "steps": 2, "checkpoint_every": 2},
    )
    assert train.loss.name == "lpips"
    output = location(str(tmp_path / "distill"))
    details = train_stage.run(train, {}, output).details
    assert details["steps"] == 2 and np.isfinite(details["final_loss"]) and details["final_loss"] > 0

    missing = TrainConfig(
        **{**train.model_dump(), "loss": {"name": "lpips", "weights": f"{s3_bucket}/weights/none.safetensors"}}
    )
    elsewhere = location(str(tmp_path / "never"))
    with pytest.raises(
        StageInputError, match="loss.weights: cannot read the LPIPS weights at s3://rectiflow-test/weights/none"
    ):
        train_stage.run(missing, {}, elsewhere)
    assert not elsewhere.exists() and not elsewhere.join(SUCCESS_FILE).exists()


def test_lpips_without_weights_is_a_config_error_naming_the_field(tmp_path):
    from workflows.config import ConfigError

    with pytest.raises(ConfigError, match=r"distill .*train.*loss: .*lpips loss needs weights"):
        load_pipeline(CONFIGS / "cifar10.yaml", overrides=["distill.0.train.loss.weights=null"], storage=str(tmp_path))
