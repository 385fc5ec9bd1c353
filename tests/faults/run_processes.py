"""The processes of one `rectiflow run` started in its own process group (``start_new_session``).

Killing the group kills the driver and the local Ray daemons it started. Ray's task and actor
workers are not in that group (each gets a process group of its own) and their titles
(``ray::Class.method``) name neither the run nor its RAY_TMPDIR; they are found as descendants of
the driver, which they stop being once the driver is dead. So a run's processes are tracked: every
descendant seen while the run lived is remembered (by pid and start time, so a reused pid is not
mistaken for one of them), and a leak check after the kill looks at all of them.
"""

from __future__ import annotations

import os
import time

import psutil


class RunProcesses:
    def __init__(self, pgid: int, ray_tmp: str):
        self.pgid = pgid
        self.ray_tmp = ray_tmp
        self._seen: dict[int, float] = {}

    def descendants(self) -> list[psutil.Process]:
        """The driver's live descendants now (remembered for :meth:`alive`)."""
        try:
            found = psutil.Process(self.pgid).children(recursive=True)
        except psutil.Error:
            return []
        for process in found:
            try:
                self._seen[process.pid] = process.create_time()
            except psutil.Error:
                pass
        return found

    def workers(self) -> list[psutil.Process]:
        """Ray worker processes running a task or actor of this run (not Ray's agents or idle workers)."""
        found = []
        for process in self.descendants():
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::") and not title.startswith(("ray::RuntimeEnvAgent", "ray::DashboardAgent", "ray::IDLE")):
                found.append(process)
        return found

    def alive(self) -> list[int]:
        """Live processes of the run: its process group, any process naming its RAY_TMPDIR, and
        every descendant seen earlier."""
        found = []
        for process in psutil.process_iter(["cmdline", "create_time"]):
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                remembered = self._seen.get(process.pid) == process.info["create_time"]
                if remembered or os.getpgid(process.pid) == self.pgid or self.ray_tmp in " ".join(process.info["cmdline"] or []):
                    found.append(process.pid)
            except (psutil.Error, ProcessLookupError):
                pass
        return found

    def leaked(self, timeout: float = 30) -> list[str]:
        """Names of the run's processes still alive ``timeout`` seconds from now (empty as soon as none is)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = self.alive()
            if not alive or time.monotonic() > deadline:
                names = []
                for pid in alive:
                    try:
                        names.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:60]}")
                    except psutil.Error:
                        pass
                return names
            time.sleep(0.3)
