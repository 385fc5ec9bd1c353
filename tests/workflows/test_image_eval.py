"""The evaluation stage on images: Inception metrics with weights the user supplies (here random
weights generated and saved by the test; nothing is downloaded), and a clear refusal when the
weights URI is missing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rf.metrics import InceptionV3, extract_features, fid, inception_hash, inception_score, kid, load_inception
from rf.models import build_model
from tests.workflows.helpers import write_teacher
from workflows.distributions import sample_by_id
from workflows.eval_files import read_table
from workflows.images import import_images
from workflows.settings import EvalConfig, EvalSubject, ImagesSpec, NoiseSpec
from workflows.stages import evaluate
from workflows.stages.eval_worker import EvalError
from workflows.storage import location

SHAPE = [3, 8, 8]
SUBJECT = EvalSubject(name="train-1", label="1-RF", family="rectified", round=1)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A tiny UNet as a finished training stage, 24 imported random images, Inception weights."""
    root = tmp_path_factory.mktemp("image-eval")
    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", images=rng.integers(0, 256, size=(24, 8, 8, 3), dtype=np.uint8))
    import_images(str(root / "images.npz"), str(root / "data"), resolution=8, channels=3, parallel=False)
    torch.manual_seed(0)
    save_file(InceptionV3().state_dict(), str(root / "inception.safetensors"))
    model = build_model(
        "unet",
        {
            "in_channels": 3,
            "resolution": 8,
            "base_channels": 8,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "num_groups": 2,
        },
    )
    write_teacher(location(str(root / "train-1")), model.eval())
    return root


def _config(root, inception: str) -> EvalConfig:
    return EvalConfig(
        subject=SUBJECT,
        pi0=NoiseSpec(shape=SHAPE),
        pi1=ImagesSpec(shape=SHAPE, uri=str(root / "data"), flip=False),
        samplers=["euler@1", "euler@2"],
        reference_solver="euler@2",
        samples=16,
        ot_samples=16,
        trajectories=0,
        inception=inception,
    )


def test_inception_metrics_with_user_weights(image_run, ray_session):
    """The stage's FID, IS and KID (features made in the workers, scored in a task) equal the
    scores of rf.metrics computed here on the stored samples and π1's reference sample."""
    root = image_run
    output = location(str(root / "eval"))
    config = _config(root, str(root / "inception.safetensors"))
    manifest = evaluate.run(config, {"model": location(str(root / "train-1"))}, output)
    files = manifest.details["files"]
    rows = {row["sampler"]: row for row in read_table(output.join(files["metrics.parquet"]["path"])).to_pylist()}
    samples = read_table(output.join(files["samples.parquet"]["path"])).to_pandas()
    inception = load_inception(str(root / "inception.safetensors"))
    reference = sample_by_id(config.pi1, config.seed + 1, np.arange(16))
    reference_features, _ = extract_features(inception, reference)
    for name, row in rows.items():
        chosen = samples[samples["sampler"] == name]
        x1 = torch.from_numpy(np.stack(chosen["x1"].to_list())).reshape(-1, *SHAPE)
        features, logits = extract_features(inception, x1)
        assert row["fid"] == pytest.approx(fid(features, reference_features), rel=1e-5)
        assert row["inception_score"] == pytest.approx(inception_score(logits)[0], rel=1e-5)
        expected_kid = kid(features, reference_features, subsets=10, subset_size=16)[0]
        assert row["kid"] == pytest.approx(expected_kid, rel=1e-4, abs=1e-9)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert math.isnan(row["fd_classifier"])
    assert manifest.details["features"]["inception"] == {
        "uri": str(root / "inception.safetensors"),
        "sha256": inception_hash(str(root / "inception.safetensors")),
    }


def test_a_missing_inception_uri_is_named_and_nothing_is_written(image_run, ray_session):
    root = image_run
    output = location(str(root / "eval-missing"))
    with pytest.raises(EvalError, match=r"evaluate.inception: .*/nowhere.safetensors does not exist"):
        evaluate.run(
            _config(root, str(root / "nowhere.safetensors")), {"model": location(str(root / "train-1"))}, output
        )
    assert not output.exists() or output.list_names() == []
