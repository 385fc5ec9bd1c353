"""Look up a class by name in a registry and construct it, with errors that name the choice."""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def construct(registry: Mapping[str, type[T]], kind: str, what: str, **options: Any) -> T:
    """``registry[kind](**options)``; an unknown ``kind`` or a bad option raises ``ValueError``
    naming ``what`` is being built."""
    try:
        cls = registry[kind]
    except KeyError:
        raise ValueError(f"unknown {what} {kind!r}; choose one of {sorted(registry)}") from None
    try:
        return cls(**options)
    except TypeError as error:
        raise ValueError(f"bad options for {what} {kind!r}: {error}") from None
