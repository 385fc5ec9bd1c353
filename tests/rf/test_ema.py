import pytest
import torch
from torch import nn

from rf.models import EMA


def _model() -> nn.Module:
    """Parameters of several shapes and buffers of two dtypes (BatchNorm's running statistics
    and its int64 batch count), so both halves of the update are exercised."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 3))


@torch.no_grad()
def _loop_update(ema: EMA, model: nn.Module) -> None:
    """The reference: the per-tensor loop that EMA.update replaced."""
    for average, current in zip(ema.model.parameters(), model.parameters()):
        average.lerp_(current.detach(), 1.0 - ema.decay)
    for average, current in zip(ema.model.buffers(), model.buffers()):
        average.copy_(current)


def _train_a_little(model: nn.Module, seed: int) -> None:
    """Moves every parameter and buffer: a random parameter step and a forward in train mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    model.train()(torch.randn(8, 5, generator=g))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 0.999999])
def test_fused_update_equals_the_per_tensor_loop_bit_for_bit(decay):
    # _foreach_lerp_ applies lerp's own arithmetic to every element, so the result is not just
    # close: it is the same bits (tolerance 0), over several updates so errors could compound.
    model = _model()
    fused, loop = EMA(model, decay), EMA(model, decay)
    for seed in range(4):
        _train_a_little(model, seed)
        previous = {name: value.clone() for name, value in fused.state_dict().items()}
        fused.update(model)
        _loop_update(loop, model)
        for (name, a), b in zip(fused.state_dict().items(), loop.state_dict().values()):
            assert torch.equal(a, b), (decay, seed, name)
        # and both are the EMA: θ_ema = d·θ_ema + (1 − d)·θ, up to float32 rounding
        for name, current in model.named_parameters():
            expected = decay * previous[name] + (1 - decay) * current.detach()
            torch.testing.assert_close(fused.state_dict()[name], expected, rtol=1e-6, atol=1e-7)
    for name, buffer in model.named_buffers():  # buffers are copied, not averaged
        assert torch.equal(fused.state_dict()[name], buffer)
    if decay == 0.0:
        for name, value in model.state_dict().items():
            assert torch.equal(fused.state_dict()[name], value)


def test_a_model_without_buffers_is_averaged_too():
    model = nn.Linear(3, 2)
    ema = EMA(model, 0.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert list(ema.model.buffers()) == [] and torch.equal(ema.model.weight, model.weight)
