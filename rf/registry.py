"""Look up a class by name in a registry and construct it, with errors that name the choice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

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


def implementations(options: Mapping[str, type], base: type[T]) -> dict[str, type[T]]:
    """For a registry of option classes, the class deriving from each that is also a ``base``
    (the torch class built on the torch-free options of :mod:`rf.options`): one list of names."""
    found = {}
    for name, option_class in options.items():
        matches = [cls for cls in option_class.__subclasses__() if issubclass(cls, base)]
        if len(matches) != 1:
            raise TypeError(f"{name}: expected one {base.__name__} built on {option_class.__name__}, found {matches}")
        found[name] = matches[0]
    return found
