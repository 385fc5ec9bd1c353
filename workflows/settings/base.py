"""The base of every setting and the one identity rule.

Every field of a setting decides a stage's result — and so counts toward its hash — unless it is
declared with :func:`neutral` (resources, logging, checkpoint cadence): fields that change how
fast or how observably a result is made, never the result. ``identity()`` is the setting without
its neutral fields, nested settings by their own ``identity()``; the stage hash is the sha256 of
the canonical JSON of (kind, identity, the inputs' hashes).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_jsonable_python

HASH_LENGTH = 16
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A plain name: a run, a distillation, a stage."""
_NEUTRAL = "result_neutral"


def neutral(default: Any = ..., **constraints: Any) -> Any:
    """A field that does not decide the result (left out of :meth:`Strict.identity`)."""
    return Field(default, json_schema_extra={_NEUTRAL: True}, **constraints)


class Strict(BaseModel):
    """Unknown keys are errors; values are frozen after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the result, as plain JSON data."""
        identity = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get(_NEUTRAL):
                continue
            identity[name] = _identity_of(getattr(self, name))
        return identity


def _identity_of(value: Any) -> Any:
    if isinstance(value, Strict):
        return value.identity()
    if isinstance(value, (list, tuple)):
        return [_identity_of(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _identity_of(item) for key, item in value.items()}
    return to_jsonable_python(value)


def content_hash(value: Any) -> str:
    """sha256 of the canonical JSON of ``value`` (sorted keys), first 16 hex digits."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_LENGTH]


def stage_hash(kind: str, identity: Any, input_hashes: dict[str, str]) -> str:
    """The hash that names a stage's output: its kind, its config's identity, its inputs' hashes."""
    return content_hash({"kind": kind, "config": identity, "inputs": input_hashes})


def plain_name(name: str) -> str:
    """``name`` when it is a plain name (letters, digits, . _ -; no '/' or '..'), else ValueError."""
    if not NAME.match(name) or ".." in name:
        raise ValueError(f"{name!r} is not a plain name (letters, digits, . _ -; no '/' or '..')")
    return name


def format_errors(error: ValidationError) -> list[str]:
    """One line per problem: ``dotted.field: message`` (``unknown key`` for an extra one)."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where or '(top level)'}: {message}")
    return lines
