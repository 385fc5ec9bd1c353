"""Train worker dies: a Ray Train worker SIGKILLed mid-stage; the stage restarts from the last
checkpoint (its step count continues) and its final weights equal an undisturbed run's."""

import threading
import time

import torch

from tests.conftest import kill_actor_process
from tests.workflows.test_train import config, run_train_stage
from workflows.stages.train import resume_checkpoint
from workflows.storage import location
from workflows.weights import load_stage_model


def _kill_a_train_worker_after(dashboard, output, step):
    """Kill a train worker once Ray Train has registered the checkpoint of ``step`` (a folder
    that is still uploading is not a checkpoint Ray would restore). Outside a pipeline the stage
    runs as ``attempt-0``: the checkpoint a later attempt (1) would resume from is attempt-0's."""
    deadline = time.time() + 120
    while time.time() < deadline:
        found = resume_checkpoint(output, 1)
        if found is not None and found[1] >= step:
            pid = kill_actor_process(dashboard, "RayTrainWorker")
            if pid is not None:
                return pid
        time.sleep(0.05)
    return None


def test_worker_killed_mid_stage_resumes_from_checkpoint_and_matches_uninterrupted(ray_session, tmp_path):
    root = location(str(tmp_path))
    settings = dict(steps=400, checkpoint_every=100)
    reference = run_train_stage(config(**settings), root.join("reference"))

    killed = []
    killer = threading.Thread(
        target=lambda: killed.append(_kill_a_train_worker_after(ray_session, root.join("faulty"), 100))
    )
    killer.start()
    manifest = run_train_stage(config(**settings), root.join("faulty"))
    killer.join()
    assert killed and killed[0] is not None, "no train worker was killed"
    assert manifest.details["steps"] == 400
    resumed = manifest.details["resumed_at_steps"]
    assert len(resumed) == 1 and 100 <= resumed[0] < 400  # continued, did not restart from 0
    assert manifest.details["examples_seen"] == reference.details["examples_seen"] == 400 * 128
    a, _ = load_stage_model(root.join("reference"))
    b, _ = load_stage_model(root.join("faulty"))
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(wa, wb, atol=1e-6), name
