"""The one recipe for fanning work out to a pool of Ray actors (couplings, evaluation, imports).

``run_on_actors(Worker, job, items, …)`` runs ``Worker(job)`` once per actor and calls it on one
item at a time, yielding each item's result row as it finishes. One item in flight per actor, so
an actor that starts late still gets its share. A killed actor is restarted and its item redone
(Ray Data's actor pools default to ``max_restarts=-1, max_task_retries=-1``), so items must be
idempotent — every caller's items are pure functions of their arguments whose outputs are created
exclusively or overwritten with the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray
from ray.data import DataContext

from workflows.ray_errors import input_error


class ItemWorker:
    """Base of a pool's worker: subclasses implement :meth:`process` for one item (a dict of
    plain values) and return a dict of equal-length columns (numpy arrays or lists)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(next(iter(batch.values())))
        parts = [self.process({key: _plain(values[i]) for key, values in batch.items()}) for i in range(count)]
        return {key: np.concatenate([np.asarray(part[key]) for part in parts]) for key in parts[0]}

    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def run_on_actors(
    worker: Callable[..., ItemWorker],
    job: Any,
    items: list[dict[str, Any]],
    workers: int,
    cpus: float,
    gpus: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Results of ``worker(job)`` on every item, row by row, as items finish (in no fixed order)."""
    if not items:
        return
    context = DataContext.get_current()
    wrapped, context.raise_original_map_exception = context.raise_original_map_exception, True
    try:  # a dataset keeps the context it was made in: the caller's stays as it was
        rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            worker,
            fn_constructor_kwargs={"job": job},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(items))), max_tasks_in_flight_per_actor=1),
            num_cpus=cpus,
            num_gpus=gpus or None,
        )
    finally:
        context.raise_original_map_exception = wrapped
    try:
        for row in rows.iter_rows():
            yield {key: _plain(value) for key, value in row.items()}
    except Exception as error:
        cause = input_error(error)
        if cause is None:
            raise
        raise cause from None
