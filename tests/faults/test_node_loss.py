"""A worker node dies (issue 16): a multi-node Ray cluster on this machine — a head with no CPUs
(the `rectiflow run` driver, the Train controller and Ray Data's coordination live there) and two
worker nodes of 2 CPUs (every actor and task that needs a CPU) — made by Ray's own
:class:`ray.cluster_utils.Cluster` in a subprocess of its own (its own ports and RAY_TMPDIR, apart
from the session's Ray), storage on the loopback S3 endpoint behind a proxy.

One whole worker node — its raylet and every worker on it — is killed (``remove_node(…,
allow_graceful=False)``) twice in one run of the small pipeline, and a replacement node joins
after each kill:

1. while couple-1 writes (some shards exist; the PUT of shard 3 is held by the proxy, so the stage
   cannot finish before the kill however fast the machine): the node of a shard-writing actor;
2. while train-2 (the reflow) trains (its step-10 checkpoint is registered, its step-20 upload is
   held): the node of the Ray Train worker.

The run finishes; every pair id is written once; the coupling's shards and the final weights
equal an undisturbed run's (the session's :func:`tests.faults.conftest.clean_small`, on another
storage root) byte for byte. The test prints when each node died, what was re-run and how long
the stages took next to the undisturbed run's. (That run shares the machine with other tests: for
a side-by-side figure on the same cluster, set ``RECTIFLOW_NODE_LOSS_BASELINE=1`` and the test
first runs the pipeline undisturbed on the same cluster, under another prefix.)
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import boto3
import numpy as np
import psutil
import s3fs

from tests.faults.conftest import model_bytes, snapshot_step
from tests.faults.run_processes import Run, RunProcesses
from tests.faults.s3_proxy import FaultyProxy
from tests.workflows.pipeline_helpers import SMALL, TINY
from workflows.config import load_pipeline
from workflows.couplings import Coupling
from workflows.manifest import SUCCESS_FILE, read_manifest
from workflows.plan import build_plan
from workflows.stages.train import RAY_DIR, RAY_RUN_NAME

BUCKET = "node-loss"
NODE_CPUS = 2
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}
"""The cluster and the driver agree on Ray's token authentication: off, explicitly. (Left unset, a
`rectiflow run` switches it on when a token file exists — a local ``ray.init`` writes one to
``~/.ray/auth_token`` — while ``Cluster`` starts its nodes without it, and the driver then refuses
the cluster's calls: "Missing authorization header".)"""

CLUSTER = r"""
import json, sys
from ray._private import ray_constants
from ray.cluster_utils import Cluster

port, agent_port = (int(value) for value in sys.argv[1:3])
fast_failure_detection = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                          "health_check_failure_threshold": 5}
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "gcs_server_port": port, "include_dashboard": False, "dashboard_agent_listen_port": agent_port,
    "_system_config": fast_failure_detection})
nodes, killed = {}, []

def say(value):
    print(json.dumps(value), flush=True)

def add():
    node = cluster.add_node(num_cpus=int(sys.argv[3]))
    name = f"worker-{len(cluster.worker_nodes) + len(killed)}"
    nodes[name] = node
    return {"node": name, "raylet": node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid}

say({"address": cluster.address, "workers": [add(), add()]})
for line in sys.stdin:
    command, *rest = line.split()
    if command == "kill":
        cluster.remove_node(nodes.pop(rest[0]), allow_graceful=False)
        killed.append(rest[0])
        say({"killed": rest[0]})
    elif command == "add":
        say(add())
    else:
        break
cluster.shutdown()
say({"shutdown": True})
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NodeCluster:
    """The cluster in its subprocess: :meth:`kill` a worker node, :meth:`add` one; ``nodes`` maps
    each live worker node's id to its raylet's pid (its workers are the raylet's children)."""

    def __init__(self, env: dict[str, str]):
        self.ray_tmp = tempfile.mkdtemp(prefix="rfn-", dir="/tmp")  # Ray's socket paths must stay short
        self.process = subprocess.Popen(
            [sys.executable, "-c", CLUSTER, str(_free_port()), str(_free_port()), str(NODE_CPUS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(self.ray_tmp, "cluster.log"), "w"),
            text=True,
            env={**os.environ, **env, **NO_AUTH, "RAY_TMPDIR": self.ray_tmp},
            start_new_session=True,
        )
        self.tracked = RunProcesses(self.process.pid, self.ray_tmp)
        started = self._answer()
        self.address = started["address"]
        self.nodes = {worker["node"]: worker["raylet"] for worker in started["workers"]}

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            with open(os.path.join(self.ray_tmp, "cluster.log")) as log:
                raise AssertionError(f"the cluster process ended:\n{log.read()[-3000:]}")
        self.tracked.descendants()
        return json.loads(line)

    def _send(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def kill(self, node: str) -> None:
        self.tracked.descendants()
        self._send(f"kill {node}")
        del self.nodes[node]

    def add(self) -> str:
        worker = self._send("add")
        self.nodes[worker["node"]] = worker["raylet"]
        return worker["node"]

    def hosting(self, title: str) -> list[str]:
        """The worker nodes that run a Ray worker whose process title contains ``title``."""
        found = []
        for node, raylet in self.nodes.items():
            try:
                children = psutil.Process(raylet).children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                try:
                    if title in " ".join(child.cmdline()):
                        found.append(node)
                        break
                except psutil.Error:
                    pass
        return found

    def close(self) -> list[str]:
        """Shut the cluster down; the names of its processes still alive after that (killed then)."""
        try:
            if self.process.poll() is None:
                self._send("quit")
                self.process.wait(timeout=60)
        except (OSError, ValueError, AssertionError, subprocess.TimeoutExpired):
            pass
        leaked = self.tracked.leaked(timeout=30)
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=30)
        for pid in self.tracked.alive():
            try:
                os.kill(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return leaked


def _wait(condition, what: str, run: Run, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"the run ended (rc {run.process.returncode}) before {what}:\n{run.output()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _stage_seconds(plan) -> dict[str, float]:
    return {name: read_manifest(stage.output).time["wall_seconds"] for name, stage in plan.stages.items()}


def test_losing_a_worker_node_while_coupling_and_while_training(s3_endpoint, clean_small):
    s3fs.S3FileSystem.clear_instance_cache()  # talk to moto directly, whatever ran before
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    storage_uri = f"s3://{BUCKET}/runs"
    plan = build_plan(load_pipeline(TINY, SMALL, storage=storage_uri))
    couple, train2 = plan.stages["couple-1"].output, plan.stages["train-2"].output
    couple_key, train_key = (stage.path.split("/", 1)[1] for stage in (couple, train2))
    events: list[tuple[float, str]] = []
    figures: dict[str, object] = {}
    runs: list[Run] = []
    with FaultyProxy(s3_endpoint) as proxy:
        cluster = NodeCluster({"AWS_ENDPOINT_URL": proxy.url})
        try:
            if os.environ.get("RECTIFLOW_NODE_LOSS_BASELINE"):
                baseline = Run(
                    TINY,
                    f"s3://{BUCKET}/baseline",
                    SMALL,
                    env={"AWS_ENDPOINT_URL": proxy.url, **NO_AUTH},
                    extra=["--address", cluster.address],
                )
                runs.append(baseline)
                assert baseline.wait(timeout=900) == 0, baseline.output()[-4000:]
                figures["undisturbed run on this cluster (s)"] = round(baseline.seconds, 1)
                figures["undisturbed stages on this cluster (s)"] = _stage_seconds(
                    build_plan(load_pipeline(TINY, SMALL, storage=f"s3://{BUCKET}/baseline"))
                )
                proxy.lines.clear()

            proxy.hold(rf"^PUT /{BUCKET}/{couple_key}/shard-000003\.parquet")
            run = Run(
                TINY,
                storage_uri,
                SMALL,
                env={"AWS_ENDPOINT_URL": proxy.url, **NO_AUTH},
                extra=["--address", cluster.address],
            )
            runs.append(run)

            def at(what: str) -> None:
                events.append((round(time.monotonic() - run.started, 1), what))

            # 1. while couple-1 writes: kill the node of a shard writer, then add a node
            _wait(
                lambda: proxy.holding.is_set() and any(name.startswith("shard-") for name in couple.list_names()),
                "couple-1's first shards and its held shard 3",
                run,
            )
            writers = cluster.hosting("ShardWriter")
            assert writers, "no shard writer found on a worker node"
            shards_before = sorted(name for name in couple.list_names() if name.startswith("shard-"))
            cluster.kill(writers[0])
            at(f"killed {writers[0]} (shard writers on {len(writers)} node(s); shards written: {len(shards_before)})")
            at(f"added {cluster.add()}")
            proxy.release()
            _wait(lambda: couple.join(SUCCESS_FILE).exists(), "couple-1 to finish", run)
            at("couple-1 finished")

            # 2. while train-2 trains: kill the node of its Ray Train worker, then add a node
            proxy.hold(rf"^PUT /{BUCKET}/{train_key}/attempt-1/{RAY_DIR}/{RAY_RUN_NAME}/step-00000020/")
            _wait(
                lambda: proxy.holding.is_set() and snapshot_step(train2, "attempt-1") == 10,
                "train-2's step-10 checkpoint and its held step-20 upload",
                run,
            )
            trainers = cluster.hosting("RayTrainWorker")
            assert trainers, "no Ray Train worker found on a worker node"
            cluster.kill(trainers[0])
            at(f"killed {trainers[0]} (the Ray Train worker's; train-2 at its step-10 checkpoint)")
            at(f"added {cluster.add()}")
            proxy.release()

            assert run.wait(timeout=900) == 0, run.output()[-4000:]
            at("the run finished")
        finally:
            for started in runs:
                started.cleanup()
            leaked = cluster.close()
    assert not leaked, f"processes of the cluster outlived its shutdown: {leaked}"
    clean = clean_small.plan()

    # every pair id once; the shards and the final weights are an undisturbed run's, byte for byte
    coupling = Coupling.open(couple)
    ids = np.concatenate([coupling.read(entry)[0] for entry in coupling.shards])
    assert ids.tolist() == list(range(coupling.pairs))
    reference = clean.stages["couple-1"].output
    for entry in coupling.shards:
        assert couple.join(entry.name).read_bytes() == reference.join(entry.name).read_bytes(), entry.name
    assert coupling.shards == Coupling.open(reference).shards
    for name in ("train-1", "train-2"):
        assert model_bytes(plan.stages[name].output) == model_bytes(clean.stages[name].output), name

    # what was re-run: shards PUT more than once (a create whose writer died is created again, or
    # found whole), train-2's restarts from a checkpoint (within its attempt: Ray Train's retry)
    puts = collections.Counter(
        match.group(1)
        for line in proxy.lines
        if (match := re.search(rf"^PUT /{BUCKET}/{couple_key}/(shard-\d+)\.parquet", line))
    )
    manifest = read_manifest(train2)
    figures["shard PUTs more than once"] = {name: count for name, count in sorted(puts.items()) if count > 1}
    figures["couple-1 shards written / reused by this run"] = (
        read_manifest(couple).details["shards_written"],
        read_manifest(couple).details["shards_reused"],
    )
    figures["train-2 resumed at steps"] = manifest.details["resumed_at_steps"]
    figures["run (s)"] = round(run.seconds, 1)
    figures["stages (s)"] = _stage_seconds(plan)
    figures["undisturbed stages, clean_small (s)"] = _stage_seconds(clean)
    print("node loss events (seconds since the run started):", json.dumps(events))
    print("node loss figures:", json.dumps(figures))
    assert manifest.details["resumed_at_steps"] == [10]  # the new worker group restored step 10's checkpoint
    assert manifest.lease["generation"] == 1  # the driver lived: no takeover, one attempt
