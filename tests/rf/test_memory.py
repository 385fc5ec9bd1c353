"""Activation memory per sample, counted on the meta device, and the inference batch it allows."""

from rf.memory import activation_bytes, inference_batch
from rf.models import MLPVelocity


def test_activation_bytes_of_an_mlp_is_the_sum_of_its_module_outputs():
    model = MLPVelocity(dim=3, width=10, depth=2, time_embed_dim=4)
    # time embedding 4, then Linear 10, SiLU 10, Linear 10, SiLU 10, Linear 3 (the Sequential's
    # output 3 again), and the model's own output 3: float32 each
    assert activation_bytes(model, [3]) == 4 * (4 + 10 + 10 + 10 + 10 + 3 + 3 + 3)
    assert all(parameter.device.type == "cpu" for parameter in model.parameters())  # the model is untouched


def test_the_batch_fits_the_budget_and_is_clamped():
    model = MLPVelocity(dim=3, width=10, depth=2, time_embed_dim=4)
    per_sample = activation_bytes(model, [3])
    assert inference_batch(model, [3], 10 * per_sample, cap=256) == 10
    assert inference_batch(model, [3], 10**9, cap=256) == 256
    assert inference_batch(model, [3], 1, cap=256) == 1
