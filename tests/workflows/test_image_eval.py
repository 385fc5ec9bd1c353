"""The evaluation stage on images: Inception metrics with weights the user supplies (here random
weights generated and saved by the test; nothing is downloaded), and a clear refusal when the
weights URI is missing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rf.metrics import InceptionV3, inception_hash
from rf.models import build_model
from tests.workflows.helpers import write_teacher
from workflows.distributions import ImagesSpec, NoiseSpec
from workflows.images import import_images
from workflows.stages.evaluate import EvalConfig, EvalError, EvalSubject, read_table, run_eval_stage
from workflows.storage import location

SHAPE = [3, 8, 8]
SUBJECT = EvalSubject(name="train-1", label="1-RF", family="rectified", round=1)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny UNet as a finished training stage, 24 imported random images, Inception weights."""
    root = tmp_path_factory.mktemp("image-eval")
    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", images=rng.integers(0, 256, size=(24, 8, 8, 3), dtype=np.uint8))
    import_images(str(root / "images.npz"), str(root / "data"), resolution=8, channels=3, progress=None)
    torch.manual_seed(0)
    save_file(InceptionV3().state_dict(), str(root / "inception.safetensors"))
    model = build_model("unet", {"in_channels": 3, "resolution": 8, "base_channels": 8, "channel_mult": [1, 2],
                                 "num_res_blocks": 1, "attn_resolutions": [], "num_groups": 2})
    write_teacher(location(str(root / "train-1")), model.eval())
    return root


def _config(root, inception: str) -> EvalConfig:
    return EvalConfig(
        pi0=NoiseSpec(shape=SHAPE), pi1=ImagesSpec(shape=SHAPE, uri=str(root / "data"), flip=False),
        samplers=["euler@1", "euler@2"], reference_solver="euler@2", samples=16, ot_samples=16, trajectories=0,
        inception=inception,
    )


def test_inception_metrics_with_user_weights(image_run, ray_session):
    root = image_run
    output = location(str(root / "eval"))
    manifest = run_eval_stage(_config(root, str(root / "inception.safetensors")), SUBJECT,
                              location(str(root / "train-1")), output)
    rows = {row["sampler"]: row for row in read_table(output.join("metrics.parquet")).to_pylist()}
    for row in rows.values():
        assert row["fid"] > 0 and math.isfinite(row["kid"])
        assert 1.0 <= row["inception_score"] <= 1008  # exp of a KL: between 1 and the class count
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert math.isnan(row["fd_classifier"])
    assert manifest["features"]["inception"] == {
        "uri": str(root / "inception.safetensors"), "sha256": inception_hash(str(root / "inception.safetensors")),
    }


def test_a_missing_inception_uri_is_named_and_nothing_is_written(image_run, ray_session):
    root = image_run
    output = location(str(root / "eval-missing"))
    with pytest.raises(EvalError, match=r"evaluate.inception: .*/nowhere.safetensors does not exist"):
        run_eval_stage(_config(root, str(root / "nowhere.safetensors")), SUBJECT, location(str(root / "train-1")), output)
    assert not output.exists() or output.list_names() == []
