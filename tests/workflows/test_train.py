"""The training stage on a real local Ray: convergence, checkpoints on S3, resume, warm start,
non-finite data, bad input."""

import math
import os

import numpy as np
import pytest
import torch

from rf.losses import velocity_loss
from rf.models import MLPVelocity
from rf.noise import noise
from rf.paths import StraightPath
from rf.timesteps import UniformTime
from tests.workflows.helpers import write_coupling, write_teacher
from workflows.manifest import SUCCESS_FILE
from workflows.settings import CoupledPairs, IndependentPairs, ModelSpec, NoiseSpec, ToySpec, TrainConfig
from workflows.shard_format import ShardError
from workflows.stage import StageInputError
from workflows.stages import train
from workflows.stages.train import TrainingStopped
from workflows.storage import location
from workflows.weights import load_stage_model, model_folder

MLP = ModelSpec(kind="mlp", config={"dim": 2, "width": 64, "depth": 2})
SHIFT = (3.0, -2.0)


GAUSSIAN_TO_SHIFTED = IndependentPairs(
    pi0=NoiseSpec(shape=[2]), pi1=ToySpec(name="gaussian_mixture", options={"centers": [list(SHIFT)]}), seed0=1, seed1=2
)


def config(**overrides) -> TrainConfig:
    settings = dict(
        model=MLP,
        steps=300,
        batch_size=128,
        lr=2e-3,
        warmup_steps=20,
        ema_decay=0.99,
        workers=2,
        checkpoint_every=100,
        log_every=100,
        data=GAUSSIAN_TO_SHIFTED,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def run_train_stage(settings: TrainConfig, output, pairs=None, init=None):
    """Train ``settings`` into ``output``: on independent pairs, or on the coupling at ``pairs``."""
    inputs = {}
    if pairs is not None:
        settings, inputs["coupling"] = settings.model_copy(update={"data": CoupledPairs()}), pairs
    if init is not None:
        inputs["init"] = init
    return train.run(settings, inputs, output)


def checkpoints(output):
    return [name for name in output.join("attempt-0", "ray", "train").list_names() if name.startswith("step-")]


def test_two_workers_reach_the_bayes_optimal_loss_and_checkpoint_to_storage(ray_session, storage_root):
    """Independent pairs N(0, I) → N(μ, I): the best velocity E[X1 − X0 | X_t] leaves, per
    dimension, Var(X1 − X0) − Cov(X1 − X0, X_t)²/Var(X_t) = 2 − (2t − 1)²/(t² + (1 − t)²), whose
    mean over t ~ U(0, 1) is π/2. A trained model's loss must come close to π/2 and can never
    go below it (beyond sampling noise)."""
    output = location(storage_root).join("run", "train-1")
    manifest = run_train_stage(config(steps=400, lr=3e-3, ema_decay=0.95), output)
    assert manifest.details["steps"] == 400 and manifest.details["examples_seen"] == 400 * 128
    assert manifest.details["resumed_at_steps"] == []
    model, _ = load_stage_model(output)
    ids = np.arange(10**6, 10**6 + 20000)
    x0, x1 = noise(11, ids, (2,)), noise(12, ids, (2,)) + torch.tensor(SHIFT)
    t = UniformTime(eps=0).sample(len(ids), torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = velocity_loss(model, StraightPath(), x0, x1, t).item()
    # 20k samples: the estimate's standard deviation is about 0.015
    assert math.pi / 2 - 0.05 < loss < math.pi / 2 + 0.1
    assert sorted(checkpoints(output))[-1] == "step-00000400"
    assert {"model.safetensors", "model.json"} <= set(model_folder(output, manifest).list_names())
    assert output.join(SUCCESS_FILE).exists()


def test_rerun_of_a_finished_stage_does_nothing(ray_session, tmp_path):
    output = location(str(tmp_path)).join("train-1")
    first = run_train_stage(config(steps=20, checkpoint_every=10), output)
    stamp = os.stat(output.join(SUCCESS_FILE).path).st_mtime_ns
    # a finished stage is returned without reading its inputs
    again = run_train_stage(config(steps=20, checkpoint_every=10), output)
    assert again == first
    assert os.stat(output.join(SUCCESS_FILE).path).st_mtime_ns == stamp


def test_warm_start_loads_the_previous_weights(ray_session, tmp_path):
    root = location(str(tmp_path))
    torch.manual_seed(3)
    teacher = MLPVelocity(dim=2, width=64, depth=2)
    write_teacher(root.join("teacher"), teacher)
    pairs = noise(1, np.arange(512), (2,))
    write_coupling(root.join("pairs"), pairs, pairs + 1.0, shard_size=128)
    # lr 1e-12 with no EMA averaging: the result is the warm-start weights, to rounding
    manifest = run_train_stage(
        config(model=None, steps=2, lr=1e-12, warmup_steps=0, ema_decay=0.0, checkpoint_every=2),
        root.join("student"),
        root.join("pairs"),
        init=root.join("teacher"),
    )
    student, _ = load_stage_model(root.join("student"))
    for (name, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-9), name
    assert manifest.inputs["init"]["hash"] == "testteacher"
    assert manifest.inputs["coupling"]["hash"] == "testcoupling"


def test_reflow_learns_a_deterministic_coupling_almost_exactly(ray_session, tmp_path):
    """Pairs x1 = x0 + c are a deterministic coupling with constant velocity c: the loss can go
    to zero, unlike independent pairs."""
    root = location(str(tmp_path))
    x0 = noise(1, np.arange(2048), (2,))
    write_coupling(root.join("pairs"), x0, x0 + torch.tensor([1.5, 0.5]), shard_size=256)
    run_train_stage(config(steps=300, ema_decay=0.9), root.join("train-2"), root.join("pairs"))
    model, _ = load_stage_model(root.join("train-2"))
    z = noise(9, np.arange(1000), (2,))
    with torch.no_grad():
        v = model(z, torch.rand(1000))
    # typical error a few hundredths after 300 steps (it keeps falling with more steps)
    assert (v - torch.tensor([1.5, 0.5])).norm(dim=1).mean() < 0.05


def test_non_finite_data_stops_with_the_step_and_keeps_the_last_checkpoint(ray_session, tmp_path):
    root = location(str(tmp_path))
    x0 = noise(1, np.arange(4096), (2,))
    write_coupling(root.join("pairs"), x0, x0 + 1.0, shard_size=512, nan_at=1000)
    output = root.join("train-2")
    with pytest.raises(TrainingStopped, match=r"stopped at step \d+: the batch contains NaN") as error:
        run_train_stage(config(steps=80, checkpoint_every=20, workers=1, batch_size=64), output, root.join("pairs"))
    assert "non-finite pairs: 1000" in str(error.value) and "last good checkpoint is kept" in str(error.value)
    assert not output.join(SUCCESS_FILE).exists()
    step = int(str(error.value).split("stopped at step ")[1].split(":")[0])
    kept = sorted(checkpoints(output))
    assert kept and int(kept[-1].split("-")[1]) <= step


def test_bad_input_fails_before_training_and_writes_nothing(ray_session, tmp_path):
    root = location(str(tmp_path))
    x0 = noise(1, np.arange(256), (3,))
    write_coupling(root.join("pairs3d"), x0, x0 + 1, shard_size=64)
    with pytest.raises(StageInputError, match=r"examples of shape \[3\] but the model takes \[2\]"):
        run_train_stage(config(), root.join("out-a"), root.join("pairs3d"))
    assert not root.join("out-a").exists()

    x0 = noise(1, np.arange(256), (2,))
    write_coupling(root.join("pairs"), x0, x0 + 1, shard_size=64)
    root.join("pairs", "shard-000002.parquet").delete()
    with pytest.raises(ShardError, match="is missing shard shard-000002.parquet"):
        run_train_stage(config(), root.join("out-b"), root.join("pairs"))
    assert not root.join("out-b").exists()

    with pytest.raises(StageInputError, match="3 shards for 4 train workers"):
        write_coupling(root.join("few"), x0[:192], x0[:192] + 1, shard_size=64)
        run_train_stage(config(workers=4, batch_size=128), root.join("out-c"), root.join("few"))
    with pytest.raises(ValueError, match="multiple of workers"):
        config(workers=3, batch_size=128)
