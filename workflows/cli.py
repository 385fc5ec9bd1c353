"""The ``rectiflow`` command: run, submit, follow and inspect pipelines.

    rectiflow run PIPELINE.yaml [--storage URI] [--set key=value …] [--address ADDR] [--no-wait]
    rectiflow submit PIPELINE.yaml --address http://HEAD:8265 [--storage URI] [--set …] [--no-wait]
                     [--working-dir DIR] [--runtime-env FILE] [--submission-id ID]
    rectiflow logs JOB_ID --address http://HEAD:8265 [--follow]
    rectiflow stop JOB_ID --address http://HEAD:8265
    rectiflow status RUN_URI [--json]
    rectiflow report RUN_URI
    rectiflow validate PIPELINE.yaml [--storage URI] [--set …]
    rectiflow data import SRC DST_URI --resolution R [--channels 1|3] [--shard-size S] [--skip-corrupt] [--ray]
    rectiflow --version

``python -m workflows.cli …`` is the same command without an installed console script (how a
submitted job runs it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
JOB_COMMANDS = ("submit", "logs", "stop")
_CLUSTER_ADDRESS = (
    "the cluster's dashboard address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)"
)


def version() -> str:
    """rectiflow's version (from the source, so a job running shipped code knows it too)."""
    from workflows import __version__

    return __version__


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="the pipeline YAML file")
    parser.add_argument("--storage", help="storage root URI (overrides the file's `storage`)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.steps=500 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rectiflow",
        description="Rectified flow (Liu, Gong, Liu, ICLR 2023) as a resumable, exactly-once pipeline on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"rectiflow {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run or resume a pipeline here (local Ray, or the cluster in RAY_ADDRESS)")
    _pipeline_arguments(run)
    run.add_argument("--address", help="Ray address to connect to (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="when another run holds a stage's lease, report who holds it and stop instead of waiting",
    )
    run.add_argument(
        "--progress-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="when stdout is not a terminal, print a progress line per running stage this often (default 30)",
    )

    submit = commands.add_parser(
        "submit", help="submit a pipeline with rectiflow's code to a Ray cluster through the Ray Jobs API"
    )
    _pipeline_arguments(submit)
    submit.add_argument("--address", help=_CLUSTER_ADDRESS)
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument(
        "--working-dir",
        default=".",
        help="folder uploaded as the job's working dir; must hold the pipeline file (default: .)",
    )
    submit.add_argument(
        "--runtime-env",
        metavar="FILE",
        help="a Ray runtime env (YAML or JSON: pip, env_vars, config …) merged into the job's",
    )
    submit.add_argument("--submission-id", metavar="ID", help="the job's id (default: one Ray makes up)")

    logs = commands.add_parser("logs", help="print a submitted job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--address", help=_CLUSTER_ADDRESS)
    logs.add_argument("--follow", action="store_true", help="stream the logs until the job ends")

    stop = commands.add_parser("stop", help="stop a submitted job (finished stages stay; re-submit to resume)")
    stop.add_argument("job_id")
    stop.add_argument("--address", help=_CLUSTER_ADDRESS)

    status = commands.add_parser("status", help="the stage table of a run, read from storage (no Ray needed)")
    status.add_argument("run", help="the run's URI: {storage}/{name}")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    report = commands.add_parser("report", help="rebuild a run's report from stored results")
    report.add_argument("run", help="the run's URI: {storage}/{name}")

    validate = commands.add_parser("validate", help="validate a pipeline file and print its stages; runs nothing")
    _pipeline_arguments(validate)

    from workflows.images.command import add_arguments as image_import_arguments

    data = commands.add_parser("data", help="image datasets as Parquet shards")
    data_actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    image_import_arguments(
        data_actions.add_parser(
            "import", help="import a folder, zip or uint8 array of images as Parquet shards of R×R PNGs"
        )
    )
    return parser


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    if name == "data":
        from workflows.images.command import data_command

        return data_command
    if name in JOB_COMMANDS:
        from workflows import jobs

        return getattr(jobs, name)
    from workflows import commands

    return getattr(commands, name)


def use_configured_token() -> None:
    """Ray clients send the cluster's auth token only in token mode, and Ray reads the mode when
    it is imported. So when a token is configured (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``) and no mode is set, switch token mode on before anything imports Ray."""
    configured = (
        "RAY_AUTH_TOKEN" in os.environ
        or "RAY_AUTH_TOKEN_PATH" in os.environ
        or os.path.exists(os.path.expanduser("~/.ray/auth_token"))
    )
    if configured and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_configured_token()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from workflows.config import ConfigError
    from workflows.storage import StorageError

    try:
        return _command(args.command)(args)
    except (ConfigError, StorageError) as error:
        print(f"rectiflow: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # submit and logs --follow, once they know the job, say themselves that it goes on and how to stop it
        resume = "; re-run the same command to resume" if args.command == "run" else ""
        print(f"rectiflow: interrupted{resume}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
