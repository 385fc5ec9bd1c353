import numpy as np
import pytest
import torch

from rf.coupling import FixedShapeVelocity, generate_pairs, pair_distance
from rf.models import MLPVelocity
from rf.noise import noise
from rf.solvers import Solver

IDS = np.arange(300)


def _teacher() -> MLPVelocity:
    torch.manual_seed(0)
    return MLPVelocity(dim=2, width=64, depth=2).eval()


def _whole_and_parts(model, solver, **options):
    """Pairs of ids 0..299 solved in one batch, and in batches of 70 (the last one of 20)."""
    whole = generate_pairs(model, solver, noise(5, IDS, (2,)), chunk=32, **options)
    parts = [
        generate_pairs(model, solver, noise(5, IDS[i : i + 70], (2,)), chunk=32, **options) for i in range(0, 300, 70)
    ]
    return whole, parts


def test_only_the_network_runs_in_bf16():
    seen = []
    weights = torch.randn(3, 3)

    def field(x, t):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return x @ weights  # a matrix product: autocast runs it in bf16

    x = torch.randn(19, 3)
    v = FixedShapeVelocity(field, chunk=8, autocast_dtype=torch.bfloat16)(x, torch.zeros(19))
    assert seen == [(torch.float32, True)] * 3  # the solver's states reach the network in float32
    assert v.dtype == torch.float32  # and the velocity comes back in the states' dtype
    assert torch.equal(v, v.bfloat16().float()) and not torch.equal(v, x @ weights)  # rounded to bf16
    assert FixedShapeVelocity(field, chunk=8)(x, torch.zeros(19)).dtype == torch.float32
    assert seen[-1] == (torch.float32, False)  # without autocast_dtype, autocast is off


def test_bf16_pairs_are_float32_batch_invariant_and_near_the_float32_pairs():
    model, solver = _teacher(), Solver.parse("rk45@1e-3")
    whole, parts = _whole_and_parts(model, solver, autocast_dtype=torch.bfloat16)
    assert whole.x1.dtype == torch.float32
    # fixed-shape chunks: the bf16 kernels see the same shapes whatever the batch, so same bits
    assert torch.equal(torch.cat([p.x1 for p in parts]), whole.x1)
    assert torch.equal(torch.cat([p.nfe for p in parts]), whole.nfe)
    fp32 = generate_pairs(model, solver, whole.x0, chunk=32)
    assert not torch.equal(whole.x1, fp32.x1)  # precision is part of what a pair is a function of
    # bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ≈ 2e-3). The network rounds inputs,
    # weights and activations, so v is off by a few u per layer, and RK45's stage weights
    # (|a_ij| up to 11.6) amplify that up to ~10x: bound the pair distance, relative to the
    # transport length, by 0.1 ≈ 50u. Measured here: 0.025.
    assert pair_distance(fp32.x0, fp32.x1, whole.x1) < 0.1


def test_compiled_sampling_is_batch_invariant_one_graph_and_matches_eager():
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, solver = _teacher(), Solver.parse("rk45@1e-4")
    assert isinstance(FixedShapeVelocity(model, 32, compile=True).model, OptimizedModule)
    whole, parts = _whole_and_parts(model, solver, compile=True)
    assert torch.equal(torch.cat([p.x1 for p in parts]), whole.x1)
    assert torch.equal(torch.cat([p.nfe for p in parts]), whole.nfe)
    # static shapes: one graph, however many samples RK45 still had active at each stage
    assert counters["stats"]["unique_graphs"] == 1
    # Inductor's kernels round differently from eager (~1e-7 relative in v); through RK45 that
    # can at most tip an accept/reject decision, whose effect the error control bounds by the
    # tolerance: atol 1e-4. Measured here: 2e-6.
    eager = generate_pairs(model, solver, whole.x0, chunk=32)
    torch.testing.assert_close(whole.x1, eager.x1, atol=1e-4, rtol=0)


def test_pair_distance_is_the_mean_error_over_the_mean_transport_length():
    x0 = torch.zeros(2, 1, 2)
    x1 = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])  # transport lengths 5 and 1: mean 3
    other = x1 + torch.tensor([[[0.0, 0.6]], [[0.0, 0.0]]])  # errors 0.6 and 0: mean 0.3
    assert pair_distance(x0, x1, other) == pytest.approx(0.1)
    assert pair_distance(x0, x1, x1) == 0.0
