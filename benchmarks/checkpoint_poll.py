"""What a training checkpoint costs at Ray Train V2's default controller poll and at a short one.

`ray.train.report` waits for the controller's next poll of its workers, every
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` seconds (2 by default). The variable is read by processes
that Ray starts, so each arm is a child process with its own local Ray: a 2D MLP trained for
``--steps`` steps on independent Gaussian pairs, one worker, a checkpoint every ``--every``
steps. It prints the wall time of each arm and their ratio; the last line is JSON.

Run: ``python benchmarks/checkpoint_poll.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ARMS = {"default (2 s)": None, "0.25 s": "0.25"}


def one_arm(steps: int, every: int) -> float:
    """Wall seconds of one training stage in a fresh local Ray (run in the child process)."""
    import ray

    from workflows.settings import IndependentPairs, ModelSpec, NoiseSpec, TrainConfig
    from workflows.stages import train
    from workflows.storage import location

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    config = TrainConfig(
        model=ModelSpec(kind="mlp", config={"dim": 2, "width": 32, "depth": 2}),
        steps=steps,
        batch_size=64,
        lr=1e-3,
        workers=1,
        checkpoint_every=every,
        log_every=steps,
        data=IndependentPairs(pi0=NoiseSpec(shape=[2]), pi1=NoiseSpec(shape=[2]), seed0=1, seed1=2),
    )
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        train.run(config, {}, location(os.path.join(root, "train")))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every this many steps (5)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"seconds": one_arm(args.steps, args.every)}))
        return
    seconds = {}
    for name, interval in ARMS.items():
        env = {key: value for key, value in os.environ.items() if key != "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
        if interval is not None:
            env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
        child = subprocess.run(
            [sys.executable, __file__, "--child", "--steps", str(args.steps), "--every", str(args.every)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        seconds[name] = json.loads(child.stdout.strip().splitlines()[-1])["seconds"]
        print(f"{name:>14}: {seconds[name]:.1f} s for {args.steps} steps, a checkpoint every {args.every}")
    ratio = seconds["default (2 s)"] / seconds["0.25 s"]
    print(f"default ÷ 0.25 s: {ratio:.2f}")
    print(json.dumps({"steps": args.steps, "every": args.every, "seconds": seconds, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
