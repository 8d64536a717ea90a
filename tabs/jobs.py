"""Slow work in the background: one low-priority worker thread; each job runs once.

The Compare tab's task-agreement curve (a head forward for every strategy at
every budget: seconds) runs here, so no slider waits for it; the page polls
the job's progress. The worker lowers its own scheduling priority (Linux
threads are tasks), so on a small CPU the live updates of everyone else go first.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from . import priority

LOG = logging.getLogger("tce.jobs")
NICE = 10  # added to the worker's niceness: below the request threads


@dataclass
class Job:
    """One piece of background work; ``run(progress)`` computes ``result``."""

    key: Hashable
    run: Callable[[Callable[[int, int], None]], object]
    done: int = 0
    total: int = 0
    result: object = None
    error: str = ""
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    event: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.event.is_set()

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def describe(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if self.finished:
            return f"done in {self.finished_at - self.started_at:.1f} s"
        if self.started_at is None:
            return "waiting for other images' curves"
        share = f"{self.done / self.total:.0%}" if self.total else "starting"
        return f"computing in the background: {share} ({time.monotonic() - self.started_at:.0f} s)"


class Jobs:
    """Jobs run one at a time by one low-priority worker thread, in the order they came."""

    def __init__(self):
        self._queue: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def once(self, memo: dict, key: Hashable, run: Callable[[Callable[[int, int], None]], object]) -> Job:
        """The job kept in ``memo[key]`` (e.g. an encoding's memo: the job lives and dies with
        it), created and queued on the first call; later calls get the same job."""
        job = Job(key, run)
        kept = memo.setdefault(key, job)  # atomic: one caller wins
        if kept is job:
            self._queue.put(job)
            with self._lock:
                if self._worker is None or not self._worker.is_alive():
                    self._worker = threading.Thread(target=self._serve, name="tce-jobs", daemon=True)
                    self._worker.start()
        return kept

    def _serve(self) -> None:
        try:  # lower this thread's priority only (best effort: not every system allows it)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except (AttributeError, OSError):
            pass
        priority.own_threads()
        while True:
            job = self._queue.get()
            job.started_at = time.monotonic()
            try:
                # in flight like a request of nobody's: while it runs no one has the server alone
                # (it takes a core; a lone step on both would time its forwards against it)
                with priority.request(object()):
                    job.result = job.run(job.progress)
            except Exception as exc:  # noqa: BLE001 - a failed job says why; the worker goes on
                LOG.exception("background job %r failed", job.key)
                job.error = f"{type(exc).__name__}: {exc}"
            job.finished_at = time.monotonic()
            job.event.set()


JOBS = Jobs()
