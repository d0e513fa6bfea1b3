"""The background worker: one thread that runs jobs an operation queues instead of waiting
for them (emptying the trash, merging a new snapshot's layers), in the order queued.

A job equal to one queued and not started yet is not queued again: the waiting one runs
after the request and does all it asks. Every commit and discard asks for a round of the
trash, and a round costs a walk over the store's image mounts: queued one per request, the
rounds of a burst of operations would pile up for minutes, and the shutdown runs them all."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CascowfsError


@dataclass(frozen=True)
class EmptyTrash:
    """Delete what is in the trash."""


@dataclass(frozen=True)
class MergeLayers:
    """Bring snapshot ``id``'s layer chain into the counter's shape (``merge_plan.py``)."""

    id: str


Job = EmptyTrash | MergeLayers


class BackgroundWorker:
    def __init__(self, run: Callable[[Job], None], name: str = "cascowfs-background") -> None:
        self._run = run
        self._name = name
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()  # ``_waiting`` and the queue's contents together
        self._waiting: set[Job] = set()  # queued, not started
        self._skipping: type | None = None  # a kind of job ``stop`` drops
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def put(self, job: Job) -> None:
        """Queue ``job``, unless an equal one is waiting already."""
        with self._lock:
            if job in self._waiting:
                return
            self._waiting.add(job)
            self._jobs.put(job)

    def waiting(self, kind: type) -> int:
        """How many jobs of ``kind`` are queued and not started yet."""
        with self._jobs.mutex:
            return sum(isinstance(job, kind) for job in self._jobs.queue)

    def join(self) -> None:
        """Wait until every job queued so far is done."""
        self._jobs.join()

    def stop(self, *, skipping: type | None = None) -> None:
        """Run the jobs queued so far, but those of kind ``skipping`` not started yet, then
        end the thread."""
        self._skipping = skipping
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            with self._lock:
                self._waiting.discard(job)
            try:
                if self._skipping is None or not isinstance(job, self._skipping):
                    self._run(job)
            except (CascowfsError, OSError):
                pass  # a snapshot pruned meanwhile, a failing disk: retried at the next need
            finally:
                self._jobs.task_done()
