"""The processes of one `rectiflow run` started in its own process group (``start_new_session``).

Killing the group kills the driver and the local Ray daemons it started. Ray's task and actor
workers are not in that group (each gets a process group of its own) and their titles
(``ray::Class.method``) name neither the run nor its RAY_TMPDIR; they are found as descendants of
the driver, which they stop being once the driver is dead. So a run's processes are tracked: every
descendant seen while the run lived is remembered (by pid and start time, so a reused pid is not
mistaken for one of them), and a leak check after the kill looks at all of them.

:class:`Run` starts one `rectiflow run` that way, with its own RAY_TMPDIR and its output in a log
file (the fault tests read what a failed or fenced run said).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import psutil

from tests.workflows.pipeline_helpers import RECTIFLOW, set_arguments


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
            agents = ("ray::RuntimeEnvAgent", "ray::DashboardAgent", "ray::IDLE")
            if title.startswith("ray::") and not title.startswith(agents):
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
                named = self.ray_tmp in " ".join(process.info["cmdline"] or [])
                if remembered or os.getpgid(process.pid) == self.pgid or named:
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


class Run:
    """One ``rectiflow run PIPELINE --storage STORAGE --set …`` in the background: its own process
    group, its own RAY_TMPDIR (under /tmp: Ray's socket paths must stay short), stdout and stderr
    in ``log`` (a temporary file by default)."""

    def __init__(
        self,
        pipeline: str,
        storage: str,
        sets: list[str],
        env: dict[str, str] | None = None,
        extra: list[str] = (),
        log: str | None = None,
    ):
        self.ray_tmp = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
        self.log = log or os.path.join(self.ray_tmp, "run.log")
        self.started = time.monotonic()
        self.seconds: float | None = None
        self._said: str | None = None
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [RECTIFLOW, "run", pipeline, "--storage", storage, *set_arguments(sets), *extra],
                env={**os.environ, "RAY_TMPDIR": self.ray_tmp, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.tracked = RunProcesses(self.process.pid, self.ray_tmp)
        threading.Thread(target=self._clock, daemon=True).start()

    def _clock(self) -> None:
        """Record when the run ends (``seconds``), whoever waits for it and when."""
        self.process.wait()
        self.seconds = time.monotonic() - self.started

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float = 900) -> int:
        code = self.process.wait(timeout=timeout)
        while self.seconds is None:  # the clock thread sets it at once
            time.sleep(0.01)
        return code

    def output(self) -> str:
        """What the run printed (stdout and stderr), so far."""
        if self._said is not None:
            return self._said
        try:
            with open(self.log, errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def signal(self, number: int) -> None:
        """Send ``number`` to the driver process alone (not its Ray)."""
        os.kill(self.process.pid, number)

    def kill(self) -> None:
        """SIGKILL the whole process group: the driver and the local Ray it started."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(timeout=60)

    def leaked(self, timeout: float = 30) -> list[str]:
        return self.tracked.leaked(timeout)

    def cleanup(self) -> None:
        """Kill what is left of the run and remove its RAY_TMPDIR (:meth:`output` keeps what it said)."""
        if self.process.poll() is None:
            self.kill()
        self.tracked.descendants()
        for pid in self.tracked.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._said = self.output()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
