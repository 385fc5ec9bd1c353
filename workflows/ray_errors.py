"""What an error that came back through Ray means, read from its chain of causes (imports no Ray).

Ray wraps what a task or actor raised (``RayTaskError.cause``, ``raise … from``), and a stage may
wrap it again; :func:`causes` walks that chain once, cycle-safe, and the two questions the
workflows ask of it are answered here: is it an error about the input (:func:`input_error`: a
corrupt shard, a changed teacher — fail naming it), or did Ray lose processes or a node
(:func:`lost_to_ray` — the stage may run again)?
"""

from __future__ import annotations

from collections.abc import Iterator

NODE_LOSS = (
    "ActorDiedError",
    "ActorUnavailableError",
    "ActorUnschedulableError",
    "NodeDiedError",
    "ObjectLostError",
    "OwnerDiedError",
    "WorkerCrashedError",
)
"""Names of the :mod:`ray.exceptions` that mean lost processes or nodes, not a wrong stage."""


def causes(error: BaseException | None, *links: str) -> Iterator[BaseException]:
    """``error``, then each error it leads to through the first of ``links`` (attribute names, e.g.
    ``"__cause__"``) that is set, each error once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = next((linked for link in links if (linked := getattr(error, link, None)) is not None), None)


def input_error(error: BaseException) -> ValueError | None:
    """The ValueError a worker raised about its input, found inside the wrappers Ray puts around
    it, so that callers see the error that names the file."""
    for cause in causes(error, "cause", "__cause__"):
        if isinstance(cause, ValueError) and not type(cause).__module__.startswith("ray"):
            return cause
    return None


def lost_to_ray(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is Ray losing a process or a node."""
    return any(
        kind.__name__ in NODE_LOSS and kind.__module__.startswith("ray.")
        for cause in causes(error, "__cause__", "__context__")
        for kind in type(cause).__mro__
    )
