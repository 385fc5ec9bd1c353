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
    return [
        (torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g) + 3, torch.rand(16, generator=g))
        for _ in range(n)
    ]


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
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0: loss = inf"):
        trainer.step(x0, torch.full_like(x1, 1e30), t)  # finite inputs whose squared error overflows
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key])
    for key, value in trainer.ema.state_dict().items():
        assert torch.equal(value, before[key])
    assert trainer.step_count == 0


# -- gradient accumulation, channels_last, LPIPS ------------------------------------------------

from contextlib import contextmanager  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

from rf.losses import EndpointLoss, make_loss, velocity_loss  # noqa: E402
from rf.models import UNet  # noqa: E402


def _params(trainer):
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def _assert_same_weights(a, b, atol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def test_accumulated_step_equals_one_step_on_the_whole_batch():
    g = torch.Generator().manual_seed(7)
    x0, x1, t = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g) + 3, torch.rand(32, generator=g)
    whole, accumulated = make_trainer(), make_trainer(grad_accumulation=4)
    for _ in range(2):  # the second step also checks that gradients do not leak between steps
        loss_whole = whole.step(x0, x1, t)
        loss_accumulated = accumulated.step(x0, x1, t)
    assert loss_accumulated.item() == pytest.approx(loss_whole.item(), rel=1e-5)
    assert accumulated.step_count == whole.step_count == 2
    _assert_same_weights(_params(whole), _params(accumulated), atol=1e-6)
    with pytest.raises(ValueError, match="does not split into grad_accumulation=4"):
        accumulated.step(x0[:30], x1[:30], t[:30])
    with pytest.raises(ValueError, match="grad_accumulation must be an integer >= 1"):
        make_trainer(grad_accumulation=0)


class _CountingWrapper(torch.nn.Module):
    """Stands in for DDP: counts the micro-batches run under ``no_sync()``."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.synced = []
        self._sync = True

    @contextmanager
    def no_sync(self):
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def forward(self, x, t):
        self.synced.append(self._sync)
        return self.module(x, t)


def test_accumulation_skips_the_gradient_all_reduce_on_all_but_the_last_micro_batch():
    torch.manual_seed(0)
    model = MLPVelocity(dim=2, width=16, depth=1)
    wrapper = _CountingWrapper(model)
    trainer = VelocityTrainer(model, StraightPath(), forward_model=wrapper, grad_accumulation=3)
    trainer.step(*(tensor[:12] for tensor in batches(1)[0]))
    assert wrapper.synced == [False, False, True]


def _tiny_unet(**overrides):
    torch.manual_seed(0)
    config = dict(
        in_channels=3,
        resolution=16,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
    )
    config.update(overrides)
    return UNet(**config)


def _image_batch(n=4, size=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, size, size, generator=g),
        torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        torch.rand(n, generator=g),
    )


def test_channels_last_trains_like_the_default_layout():
    x0, x1, t = _image_batch()
    default = VelocityTrainer(_tiny_unet(), StraightPath(), lr=1e-3)
    nhwc = VelocityTrainer(_tiny_unet(), StraightPath(), lr=1e-3, channels_last=True)
    assert nhwc.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not default.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        loss_default = default.step(x0, x1, t)
        loss_nhwc = nhwc.step(x0, x1, t)
    assert loss_nhwc.item() == pytest.approx(loss_default.item(), rel=1e-4)
    _assert_same_weights(_params(default), _params(nhwc), atol=1e-5)
    # checkpoints are layout-free: a channels_last trainer restores into a default one
    restored = VelocityTrainer(_tiny_unet(), StraightPath(), lr=1e-3)
    restore_trainer(restored, trainer_to_files(nhwc), "memory")
    _assert_same_weights(_params(nhwc), _params(restored), atol=0)


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory):
    """A random LPIPS weights file in the real key names (positive linear weights)."""
    return _lpips_weights_file(tmp_path_factory.mktemp("lpips"))


def _lpips_weights_file(directory):
    from rf.lpips import LPIPS

    torch.manual_seed(0)
    state = {k: v for k, v in LPIPS().state_dict().items() if k not in ("shift", "scale")}
    for name, tensor in state.items():
        if name.startswith("lin"):
            state[name] = torch.rand(tensor.shape) + 0.1
        else:
            state[name] = torch.randn(tensor.shape) * 0.05
    path = directory / "lpips.safetensors"
    save_file(state, str(path))
    return path


def test_lpips_loss_compares_the_predicted_endpoint_with_x1(lpips_weights):
    """x̂1 = x_t + (1 − t)·v(x_t, t) against x1: at t = 0 it is LPIPS(x0 + v(x0, 0), x1)."""
    loss = make_loss("lpips", weights=lpips_weights, resize=0)
    assert isinstance(loss, EndpointLoss)
    model = _tiny_unet()
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # a fresh UNet predicts v = 0
    x0, x1, _ = _image_batch()
    lpips = loss.image_loss.lpips
    with torch.no_grad():
        at_zero = velocity_loss(model, StraightPath(), x0, x1, torch.zeros(4), loss)
        expected = lpips(x0 + model(x0, torch.zeros(4)), x1).mean()
        torch.testing.assert_close(at_zero, expected)
        t = torch.full((4,), 0.25)
        xt = 0.25 * x1 + 0.75 * x0
        expected = lpips(xt + 0.75 * model(xt, t), x1).mean()
        torch.testing.assert_close(velocity_loss(model, StraightPath(), x0, x1, t, loss), expected)


def test_lpips_losses_train_the_model_and_never_the_lpips_network(lpips_weights):
    for name in ("lpips", "lpips_huber"):
        loss = make_loss(name, weights=lpips_weights, resize=0)
        trainer = VelocityTrainer(_tiny_unet(), StraightPath(), loss=loss, lr=1e-3)
        frozen = {k: v.clone() for k, v in loss.state_dict().items()}
        before = _params(trainer)
        x0, x1, t = _image_batch()
        value = trainer.step(x0, x1, t)
        assert value > 0 and trainer.step_count == 1
        assert any(not torch.equal(before[k], v) for k, v in _params(trainer).items()), name
        assert all(torch.equal(frozen[k], v) for k, v in loss.state_dict().items()), name


def test_lpips_loss_needs_its_weights(tmp_path):
    with pytest.raises(ValueError, match="lpips loss needs weights"):
        make_loss("lpips")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        make_loss("lpips_huber", weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no option c"):
        make_loss("lpips", weights=tmp_path / "w.safetensors", c=1.0)


# -- host syncs and torch.compile ---------------------------------------------------------------

_HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def _counting_host_reads(monkeypatch, exempt):
    """Counts, in a list of method names, every call of a Tensor method through which Python reads
    a tensor's values: on a GPU each one waits until the device has drained its queue (a host
    sync). Tensors whose id is in ``exempt`` live on the CPU even when training on a GPU, so
    reading them is no sync; here that is Adam's step counts, which ``torch.optim.Adam`` keeps as
    CPU tensors (unless ``capturable`` or ``fused``) and reads with ``.item()`` every step."""
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if id(self) not in exempt:
                reads.append(name)
            return original(self, *args, **kwargs)

        return read

    with monkeypatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, counting(name))
        yield reads


def test_a_step_makes_one_host_sync_and_returns_the_loss_as_a_device_tensor(monkeypatch):
    # clipping (grad_clip=1.0), warm-up, two micro-batches, the EMA: every part of a step runs
    trainer = make_trainer(warmup_steps=3, grad_accumulation=2)
    data = batches(5)
    trainer.step(*data[0])  # creates Adam's state, its step counts among it
    exempt = {id(state["step"]) for state in trainer.optimizer.state.values()}
    per_step = []
    with _counting_host_reads(monkeypatch, exempt) as reads:
        for index, batch in enumerate(data[1:]):
            before = len(reads)
            loss = trainer.step(*batch)
            if index == 2:
                float(loss)  # a caller reading the loss pays one more sync, and the hook sees it
            if index == 3:
                loss.item()
            per_step.append(reads[before:])
    assert per_step == [["tolist"], ["tolist"], ["tolist", "__float__"], ["tolist", "item"]]
    assert loss.dim() == 0 and loss.dtype == torch.float32 and not loss.requires_grad
    assert trainer.step_count == 5


def test_compiled_training_follows_the_eager_loss_trajectory():
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = batches(20)
    eager, compiled = make_trainer(), make_trainer(compile=True)
    assert isinstance(compiled.forward_model, OptimizedModule) and compiled.forward_model._orig_mod is compiled.model
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # checkpoints keep their names
    eager_losses = torch.stack([eager.step(*batch) for batch in data])
    compiled_losses = torch.stack([compiled.step(*batch) for batch in data])
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model: it really compiled
    # Inductor fuses and reorders float32 arithmetic, so the losses differ by rounding: a few ulp
    # (float32 ulp ~6e-8 relative) carried through 20 Adam steps; measured here: 7e-8 at most.
    # rtol 1e-5 leaves > 100x room, while the loss falls by ~2 % a step (13.8 → 8.7 over the
    # 20), so a wrong compiled gradient would be off by far more within a step or two.
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=0)
    assert eager_losses[-1] < 0.8 * eager_losses[0]  # the trajectory moves: the comparison is not vacuous


def _step_on_rank(rank: int, world: int, folder: str) -> None:
    """One DDP rank (gloo): a step where only rank 1's batch holds a NaN, then a good step."""
    import json

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MLPVelocity(dim=2, width=8, depth=1)
        trainer = VelocityTrainer(model, StraightPath(), lr=1e-2, forward_model=DistributedDataParallel(model))
        before = _params(trainer)
        x0, x1, t = batches(1, seed=1 + rank)[0]
        if rank == 1:
            x1[0, 0] = float("nan")
        try:
            trainer.step(x0, x1, t)
            outcome = "stepped"
        except NonFiniteLossError as error:
            outcome = error.detail
        unchanged = all(torch.equal(before[k], v) for k, v in _params(trainer).items())
        loss = trainer.step(*batches(1, seed=10 + rank)[0])  # NaN gradients of the failed step must not leak
        weights = torch.cat([v.flatten() for v in _params(trainer).values()])
        report = {"outcome": outcome, "unchanged": unchanged, "loss": float(loss), "weights": weights.tolist()}
        pathlib.Path(folder, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_a_non_finite_batch_on_one_rank_stops_every_rank_before_the_weights_change(tmp_path):
    import json

    torch.multiprocessing.spawn(_step_on_rank, args=(2, str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    # the batch and loss flags are all-reduced together (MIN): rank 0's own batch and loss were
    # finite, yet it stops with rank 1's reason instead of stepping alone and hanging later
    assert [r["outcome"] for r in reports] == ["the batch contains NaN or inf values"] * 2
    assert all(r["unchanged"] for r in reports)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in reports)
    assert reports[0]["weights"] == reports[1]["weights"]  # the good step kept the ranks in sync
    assert all(torch.isfinite(torch.tensor(r["weights"])).all() for r in reports)
