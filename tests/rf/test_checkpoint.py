import pickle

import pytest
import torch

from rf.checkpoint import CheckpointError, load_model, model_from_files, model_to_files, save_model
from rf.models import EMA, MLPVelocity, build_model, model_spec


class _Exploit:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = MLPVelocity(dim=3, width=32, depth=2)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert model_spec(loaded) == model_spec(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_loading_refuses_a_pickle_and_runs_no_code(tmp_path):
    model = MLPVelocity(dim=2, width=8, depth=1)
    files = model_to_files(model)
    marker = tmp_path / "pwned"
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_Exploit(str(marker))))
    (tmp_path / "model.json").write_bytes(files["model.json"])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(tmp_path)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")  # a torch pickle
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(tmp_path)
    assert not marker.exists()


def test_loading_names_missing_and_mismatched_files(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(tmp_path)
    small = model_to_files(MLPVelocity(dim=2, width=8, depth=1))
    big = model_to_files(MLPVelocity(dim=2, width=16, depth=1))
    with pytest.raises(CheckpointError, match="do not match"):
        model_from_files(small["model.safetensors"], big["model.json"])
    with pytest.raises(CheckpointError, match="not a model spec"):
        model_from_files(small["model.safetensors"], b"[1, 2]")


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model kind 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="bad options for model kind 'mlp'"):
        build_model("mlp", {"size": 3})


def test_ema_tracks_the_moving_average():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    for value in (1.0, 1.0, 1.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    # 0 → 0.5 → 0.75 → 0.875
    assert ema.model.weight.item() == pytest.approx(0.875)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
