"""Chaos soak (a script, not a test: pytest collects only ``test_*.py``). ``make soak`` runs it.

The toy pipeline (tests/workflows/data/tiny.yaml, made smaller with ``--set``) is run again and
again on ONE storage root; each run gets SIGKILLed — its whole process group: the `rectiflow run`
driver and the local Ray it started — at a random time, sometimes after a random Ray worker
process of it was SIGKILLed first, until ``--kills`` kills were injected (or ``--max-minutes``
passed); then one last run goes to the end. Alongside, an uninterrupted run works on another root.

At the end it checks that:

- the key results of every stage's manifest (losses, step counts, shard checksums, pair counts,
  evaluation rows; not times, hosts, resume counts, URIs, lease generations or which
  ``attempt-N`` folder holds a file) equal the clean run's;
- the final weights of every training stage equal the clean run's, bit for bit;
- ``metrics.parquet`` of the report (without timing columns) equals the clean run's;
- every lease file left is beside a finished stage (a run killed between a manifest and its
  release) and held by no live process;
- no Ray process of any run (its process group, or any process naming its own RAY_TMPDIR) lives;
- no temporary file (``*.tmp*``) is left in the soaked storage root;

prints one summary line and exits non-zero when anything does not hold.

    python tests/faults/soak.py [--kills 5] [--max-minutes 15] [--seed N] [--storage DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import psutil  # noqa: E402

from tests.faults.conftest import model_bytes  # noqa: E402
from tests.faults.run_processes import Run  # noqa: E402
from tests.workflows.pipeline_helpers import SMALL, TINY, metrics_of  # noqa: E402
from workflows.config import load_pipeline  # noqa: E402
from workflows.lease import LEASE_FILE  # noqa: E402
from workflows.manifest import SUCCESS_FILE  # noqa: E402
from workflows.plan import build_plan  # noqa: E402

VOLATILE = {
    "time",
    "code",
    "lease",
    "resumed_at_steps",
    "shards_reused",
    "shards_written",
    "bytes_written",
    "inputs",
    "files",
    "finished_at",
    "started_at",
    "uri",
    "host",
    "pid",
}
"""Manifest keys that may differ between an interrupted and a clean run (times, provenance, the lease
generation a stage finished under)."""
ATTEMPT = re.compile(r"attempt-\d+")
"""A resumed stage writes into ``attempt-{generation}``: file names are compared without the number."""


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def key_results(value):
    """``value`` without volatile keys (recursively) and without timing figures."""
    if isinstance(value, dict):
        return {
            key: key_results(item)
            for key, item in value.items()
            if key not in VOLATILE and not key.endswith("_seconds") and not key.endswith("per_second")
        }
    if isinstance(value, list):
        return [key_results(item) for item in value]
    if isinstance(value, str):
        return ATTEMPT.sub("attempt-N", value)
    return value


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}.{key}: only in one" for key in set(a) ^ set(b)]
        for key in sorted(set(a) & set(b)):
            found += differences(a[key], b[key], f"{where}.{key}")
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
        return [] if same else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="driver kills to inject before the last run (5)")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="stop injecting kills after this long (15)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill times (random by default)")
    parser.add_argument(
        "--worker-kill-rate",
        type=float,
        default=0.3,
        help="chance that a Ray worker is killed before the driver is (0.3)",
    )
    parser.add_argument("--min-delay", type=float, default=8.0, help="earliest kill, seconds after a start (8)")
    parser.add_argument("--max-delay", type=float, default=80.0, help="latest kill, seconds after a start (80)")
    parser.add_argument("--storage", default=None, help="folder for both roots (a temporary one by default, removed)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="pipeline overrides (default: a smaller tiny.yaml)",
    )
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    sets = options.sets or SMALL
    base = Path(options.storage or tempfile.mkdtemp(prefix="rectiflow-soak-"))
    soaked, clean_root = str(base / "soaked"), str(base / "clean")
    log(f"seed {seed}; storage {base}; up to {options.kills} kills in {options.max_minutes} min")

    started = time.monotonic()
    deadline = started + options.max_minutes * 60
    runs: list[Run] = []
    clean = Run(TINY, clean_root, sets)
    runs.append(clean)
    driver_kills = worker_kills = 0
    problems: list[str] = []
    try:
        while driver_kills < options.kills and time.monotonic() < deadline:
            run = Run(TINY, soaked, sets)
            runs.append(run)
            at = rng.uniform(options.min_delay, options.max_delay)
            worker_at = rng.uniform(options.min_delay, at) if rng.random() < options.worker_kill_rate else None
            while run.process.poll() is None and time.monotonic() - run.started < at:
                run.tracked.descendants()  # remembered, for the leak check after the kill
                if worker_at is not None and time.monotonic() - run.started >= worker_at:
                    workers = run.tracked.workers()
                    if workers:
                        victim = rng.choice(workers)
                        try:
                            title = " ".join(victim.cmdline())[:40]
                            victim.kill()
                            worker_kills += 1
                            log(f"run {len(runs) - 1}: killed Ray worker {victim.pid} ({title}) at {worker_at:.0f} s")
                        except psutil.Error:
                            pass
                        worker_at = None  # else: no worker yet, look again
                time.sleep(0.2)
            if run.process.poll() is not None:
                log(f"run {len(runs) - 1} ended by itself (rc {run.process.returncode}) before its kill at {at:.0f} s")
                if run.process.returncode == 0:
                    break
                continue  # a worker kill may fail a stage; the next run resumes it
            run.kill()
            driver_kills += 1
            leaked = run.leaked()
            if leaked:
                problems.append(f"run {len(runs) - 1}: processes alive after the kill: {leaked}")
            log(f"run {len(runs) - 1}: killed the driver's process group at {at:.0f} s (kill {driver_kills})")

        if runs[-1] is not clean and runs[-1].process.returncode == 0:
            final_rc = 0
        else:
            log("last run, to the end")
            run = Run(TINY, soaked, sets)
            runs.append(run)
            final_rc = run.process.wait(timeout=900)
        if final_rc != 0:
            problems.append(f"the last run failed (rc {final_rc})")
        clean_rc = clean.process.wait(timeout=900)
        if clean_rc != 0:
            problems.append(f"the clean run failed (rc {clean_rc})")
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.kill()

    equal = False
    if not problems:
        plan = build_plan(load_pipeline(TINY, sets, storage=soaked))
        clean_plan = build_plan(load_pipeline(TINY, sets, storage=clean_root))
        found = []
        for name, stage in plan.stages.items():
            ours = key_results(stage.output.join(SUCCESS_FILE).read_json())
            theirs = key_results(clean_plan.stages[name].output.join(SUCCESS_FILE).read_json())
            found += [f"{name}{line}" for line in differences(ours, theirs)]
            if stage.kind == "train" and model_bytes(stage.output) != model_bytes(clean_plan.stages[name].output):
                found.append(f"{name}: the final weights differ from the clean run's")
        try:
            pd.testing.assert_frame_equal(metrics_of(plan), metrics_of(clean_plan))
        except AssertionError as error:
            found.append(f"metrics.parquet differs: {error}")
        problems += found
        equal = not found
    for index, run in enumerate(runs):
        leaked = run.leaked(timeout=10)
        if leaked:
            problems.append(f"run {index}: Ray processes leaked: {leaked}")
        run.cleanup()
    temporary = [str(path) for path in Path(soaked).rglob("*") if ".tmp" in path.name]
    if temporary:
        problems.append(f"temporary files left in storage: {temporary[:10]}")
    for lease in Path(soaked).rglob(LEASE_FILE):
        holder = json.loads(lease.read_bytes())
        if not (lease.parent / SUCCESS_FILE).exists() or psutil.pid_exists(holder["pid"]):
            problems.append(f"a lease is left beside an unfinished stage or held by a live process: {lease}")
    for problem in problems:
        log(f"PROBLEM {problem[:2000]}")
    summary = {
        "seed": seed,
        "driver_kills": driver_kills,
        "worker_kills": worker_kills,
        "runs": len(runs) - 1,
        "equal": equal,
        "leaked": any("leaked" in p or "alive" in p for p in problems),
        "temp_files": len(temporary),
        "minutes": round((time.monotonic() - started) / 60, 1),
        "ok": not problems,
    }
    print("soak: " + json.dumps(summary), flush=True)
    if options.storage is None and not problems:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
