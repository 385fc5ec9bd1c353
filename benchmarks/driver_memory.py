"""What the pipeline's driver pays as the work grows: memory of an evaluation, requests and bytes
to open a coupling, and the memory of blocked k-NN precision/recall.

On a cluster the driver is the Ray Job entrypoint on a small head node; nothing it does may grow
with the number of samples, pairs or shards. Four figures, each measured side by side in one run:

- ``eval_rss_ratio_10x``: the driver's peak resident set during an evaluation stage of M = 10·M0
  samples ÷ during one of M0 (images 3×32×32 from an untrained 32² UNet, samplers euler@1 and
  euler@4; every number computed in workers). Each arm runs in a fresh process with its own local
  Ray; the peak is ``VmHWM`` of the driver process only (reset through ``/proc/self/clear_refs``
  just before the stage). Goal ≤ 1.2.
- ``open_requests_per_shard``: HTTP requests the driver makes to open a coupling of 10,000 shards
  on a loopback S3 (moto), counted by a proxy in front of it, ÷ shards. Goal ≤ 0.01.
- ``open_bytes_ratio_10x``: response bytes to open 10× the shards (10,000 vs 1,000) ÷ the same
  ratio of the manifest's size: 1 when the driver reads only the manifest and listings (whose
  sizes both grow with the shards), more if it read shards.
- ``knn_block_peak_mb``: from ``benchmarks/knn_memory.py`` (blocked precision/recall at N = 50,000,
  d = 64). Goal ≤ 1,000.

Run: ``python benchmarks/driver_memory.py`` (a few minutes on 2 cores; ``--skip-knn`` leaves out
the k-NN arm). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

EVAL_ARM = """
import json, re, sys
from pathlib import Path
import ray, torch
samples, root = int(sys.argv[1]), sys.argv[2]
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
from rf.models import build_model
from tests.workflows.helpers import write_teacher
from workflows.settings import EvalConfig, EvalSubject, NoiseSpec
from workflows.stages import evaluate
from workflows.storage import location
torch.manual_seed(0)
model = build_model("unet", {"in_channels": 3, "resolution": 32, "base_channels": 8, "channel_mult": [1, 2],
                             "num_res_blocks": 1, "attn_resolutions": [], "num_groups": 2}).eval()
write_teacher(location(root).join("train-1"), model)
noise = NoiseSpec(shape=[3, 32, 32])
config = EvalConfig(subject=EvalSubject(name="train-1", label="1-RF", family="rectified", round=1), pi0=noise,
                    pi1=noise, samplers=["euler@1", "euler@4"], reference_solver="euler@4", samples=samples,
                    ot_samples=200, trajectories=0, workers=2)
Path("/proc/self/clear_refs").write_text("5")
evaluate.run(config, {"model": location(root).join("train-1")}, location(root).join("eval"))
status = Path("/proc/self/status").read_text()
print(json.dumps({"peak_mb": int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024}))
"""


def eval_arm(samples: int) -> float:
    """The driver's peak RSS (MB) of an evaluation of ``samples`` samples, in a fresh process."""
    with tempfile.TemporaryDirectory() as root:
        result = subprocess.run(
            [sys.executable, "-c", EVAL_ARM, str(samples), root],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=3600,
        )
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_arms(shard_counts: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Requests and response bytes to open couplings of ``shard_counts`` shards, through a
    counting proxy in front of a moto S3 server."""
    import boto3
    import numpy as np
    import torch
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    from tests.faults.s3_proxy import FaultyProxy
    from tests.workflows.helpers import write_coupling
    from workflows.couplings import Coupling
    from workflows.manifest import SUCCESS_FILE
    from workflows.storage import location

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-open")
    results = {}
    try:
        for shards in shard_counts:
            folder = location(f"s3://bench-open/coupling-{shards}")
            x0 = torch.from_numpy(np.random.default_rng(shards).standard_normal((shards * 2, 2)).astype(np.float32))
            write_coupling(folder, x0, x0 + 1, shard_size=2)
            manifest_bytes = len(folder.join(SUCCESS_FILE).read_bytes())
            with FaultyProxy(endpoint) as proxy:
                import s3fs

                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                s3fs.S3FileSystem.clear_instance_cache()
                Coupling.open(location(folder.uri))
                counts = dict(proxy.counts)
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            s3fs.S3FileSystem.clear_instance_cache()
            results[shards] = {
                "requests": counts.get("forwarded", 0),
                "bytes": counts.get("bytes_out", 0),
                "manifest_bytes": manifest_bytes,
            }
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500, help="M0 of the evaluation arms (default 500)")
    parser.add_argument("--skip-knn", action="store_true", help="leave out benchmarks/knn_memory.py")
    args = parser.parse_args()

    small, large = eval_arm(args.samples), eval_arm(10 * args.samples)
    print(f"evaluation driver peak: {small:.0f} MB at M = {args.samples}, {large:.0f} MB at M = {10 * args.samples}")
    opened = open_arms((1000, 10000))
    for shards, figures in opened.items():
        print(
            f"open a coupling of {shards} shards: {figures['requests']} requests, {figures['bytes']} bytes "
            f"(manifest {figures['manifest_bytes']} bytes)"
        )
    summary = {
        "eval_rss_ratio_10x": round(large / small, 3),
        "eval_driver_peak_mb": {args.samples: round(small, 1), 10 * args.samples: round(large, 1)},
        "open_requests_per_shard": round(opened[10000]["requests"] / 10000, 5),
        "open_bytes_ratio_10x": round(
            (opened[10000]["bytes"] / opened[1000]["bytes"])
            / (opened[10000]["manifest_bytes"] / opened[1000]["manifest_bytes"]),
            3,
        ),
        "open_requests": {shards: figures["requests"] for shards, figures in opened.items()},
    }
    if not args.skip_knn:
        knn = subprocess.run(
            [sys.executable, str(HERE / "knn_memory.py")], capture_output=True, text=True, cwd=ROOT, check=True
        )
        summary["knn_block_peak_mb"] = json.loads(knn.stdout.strip().splitlines()[-1])["knn_block_peak_mb"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
