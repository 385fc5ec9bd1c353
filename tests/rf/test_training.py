import ast
import pathlib

import pytest
import torch

from rf.checkpoint import CheckpointError, restore_trainer, trainer_to_files
from rf.models import MLPVelocity
from rf.paths import StraightPath
from rf.training import NonFiniteLossError, VelocityTrainer


def make_trainer(**options):
    torch.manual_seed(0)
    return VelocityTrainer(MLPVelocity(dim=2, width=32, depth=2), StraightPath(), lr=1e-3, **options)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g) + 3, torch.rand(16, generator=g)) for _ in range(n)]


def test_resume_from_files_equals_uninterrupted():
    data = batches(10)
    straight = make_trainer(warmup_steps=4)
    for batch in data:
        straight.step(*batch)
    first = make_trainer(warmup_steps=4)
    for batch in data[:6]:
        first.step(*batch)
    files = trainer_to_files(first)
    resumed = VelocityTrainer(MLPVelocity(dim=2, width=32, depth=2), StraightPath(), lr=1e-3, warmup_steps=4)
    restore_trainer(resumed, files, "memory")
    assert resumed.step_count == 6
    for batch in data[6:]:
        resumed.step(*batch)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_restore_refuses_incomplete_or_mismatched_state():
    files = trainer_to_files(make_trainer())
    del files["ema.safetensors"]
    with pytest.raises(CheckpointError, match="missing ema.safetensors"):
        restore_trainer(make_trainer(), files, "ckpt")
    other = VelocityTrainer(MLPVelocity(dim=2, width=8, depth=1), StraightPath())
    with pytest.raises(CheckpointError, match="does not fit"):
        restore_trainer(other, trainer_to_files(make_trainer()), "ckpt")


def test_warmup_is_linear_then_constant():
    trainer = make_trainer(warmup_steps=10)
    assert trainer.learning_rate(0) == pytest.approx(1e-4)
    assert trainer.learning_rate(4) == pytest.approx(5e-4)
    assert trainer.learning_rate(50) == pytest.approx(1e-3)


def test_training_reduces_the_loss():
    trainer = make_trainer()
    data = batches(300)
    first = trainer.step(*data[0])
    losses = [trainer.step(*batch) for batch in data[1:]]
    # independent N(0,I) → N(3,I) pairs: the best velocity leaves Var(X1 − X0)/d ≈ 2 of
    # irreducible loss at the ends of the path; the mean offset (3, 3) must be learnt.
    assert sum(losses[-50:]) / 50 < 0.5 * first


def test_non_finite_loss_or_batch_stops_before_any_weight_changes():
    trainer = make_trainer()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    x0, x1, t = batches(1)[0]
    x1[3, 1] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 0: the batch contains NaN"):
        trainer.step(x0, x1, t)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0"):
        trainer.step(x0, torch.full_like(x1, 1e30), t)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key])
    assert trainer.step_count == 0


def test_rf_never_imports_ray_fsspec_or_pyarrow():
    forbidden = {"ray", "fsspec", "pyarrow", "s3fs", "workflows"}
    for path in pathlib.Path("rf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path} imports {name}"
