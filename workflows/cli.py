"""The ``rectiflow`` command."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="rectiflow",
        description="Rectified flow as a resumable workflow on Ray. The pipeline commands "
        "(run, submit, status, report) arrive with the pipeline; `make demo` runs the toy table.",
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    build_parser().print_help()
    return 0
