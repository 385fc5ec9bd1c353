"""The manifest: ``_SUCCESS.json``, one typed record that every stage writes last.

Every stage — import, training, coupling, classifier, evaluation, report — writes the same shape::

    kind      the stage's kind (train, couple, eval, import, classifier, report)
    hash      the stage hash: kind, the config's identity and the inputs' hashes
    stage     the output folder's name
    config    the stage's whole config (JSON), and ``identity``, the part that decides the result
    inputs    {role: {"uri", "hash"}} of every input stage (a coupling's teacher, a reflow's
              coupling and warm start, …)
    time      started/finished at, wall, CPU and GPU seconds, host
    code      rectiflow (and git commit), torch, ray, python versions
    details   what the kind adds (a coupling's shards, a model's steps and loss, an evaluation's
              rows, a dataset's images …), always with ``summary``: one line of what the stage
              made, which the report's lineage shows
    lease     the lease generation the stage ran under (fencing; see :mod:`workflows.lease`)

A stage is done exactly when its ``_SUCCESS.json`` exists; no credential is ever written here.
This module is light (no Ray, no torch), so ``status`` and ``report`` can read manifests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from workflows.lease import LEASE_FILE
from workflows.storage import Location

SUCCESS_FILE = "_SUCCESS.json"
logger = logging.getLogger("rectiflow.stage")


class StageNotFinished(RuntimeError):
    """An input stage has no ``_SUCCESS.json``."""


class ManifestError(ValueError):
    """A ``_SUCCESS.json`` is not a rectiflow manifest."""


@dataclass(frozen=True)
class Manifest:
    """What a finished stage made, from what, how, and at what cost (see the module docstring)."""

    kind: str
    hash: str
    stage: str
    config: dict[str, Any]
    identity: dict[str, Any]
    inputs: dict[str, dict[str, str]]
    time: dict[str, Any]
    code: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    lease: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any, source: str) -> Manifest:
        """The manifest in ``value`` (read from ``source``); :class:`ManifestError` naming it otherwise."""
        names = [name for name in cls.__dataclass_fields__]
        if not isinstance(value, dict):
            raise ManifestError(f"{source} is not a stage manifest (a {type(value).__name__}, not a mapping)")
        missing = [
            name
            for name in ("kind", "hash", "stage", "config", "identity", "inputs", "time", "code")
            if name not in value
        ]
        if missing:
            raise ManifestError(f"{source} is not a stage manifest: it has no {', '.join(missing)}")
        return cls(**{name: value[name] for name in names if name in value})

    def input_hash(self, role: str) -> str | None:
        entry = self.inputs.get(role)
        return entry.get("hash") if entry else None


def is_done(output: Location) -> bool:
    return output.join(SUCCESS_FILE).exists()


def read_manifest(output: Location) -> Manifest:
    """The manifest of a finished stage; :class:`StageNotFinished` when there is none."""
    marker = output.join(SUCCESS_FILE)
    try:
        value = marker.read_json()
    except FileNotFoundError:
        raise StageNotFinished(f"stage output {output.uri} is not finished (no {SUCCESS_FILE})") from None
    return Manifest.from_json(value, marker.uri)


def write_manifest(output: Location, manifest: Manifest) -> None:
    """Write ``_SUCCESS.json``: call this last, after every other object of the stage. The stage's
    writers are done by then, so a temporary file still under a local output was left by a worker
    killed mid-write (its retry wrote the object again) and is removed first — except the lease's,
    which may belong to another run trying to create the lease at this moment."""
    removed = output.remove_temporaries(sparing=LEASE_FILE)
    if removed:
        logger.info("removed %d temporary files that killed writers left under %s", len(removed), output.uri)
    output.join(SUCCESS_FILE).write_json(manifest.to_json())


def describe_differences(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """``key: found (there) vs expected (here)`` for every top-level key whose values differ."""
    keys = sorted(set(expected) | set(found), key=str)
    return "; ".join(
        f"{key}: {json.dumps(found.get(key))} there vs {json.dumps(expected.get(key))} here"
        for key in keys
        if expected.get(key) != found.get(key)
    )
