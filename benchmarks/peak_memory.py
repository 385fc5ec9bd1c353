"""The peak memory of this process tree while a block runs (shared by the memory benchmarks)."""

from __future__ import annotations

import threading
import time

import psutil


def tree_pss() -> int:
    """Bytes of PSS summed over this process and every process below it (Ray's workers, raylet
    and object store when it started them): shared pages are split, not counted twice."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except psutil.Error:
            pass
    return total


class PeakPSS:
    """``with PeakPSS(interval) as peak: …`` samples :func:`tree_pss` in a background thread
    every ``interval`` seconds; ``peak.peak`` is the largest sample."""

    def __init__(self, interval: float = 0.2) -> None:
        self.peak, self.interval = 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakPSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
