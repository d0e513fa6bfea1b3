"""Labels served on the trio thread, not in a worker thread.

A tree search relabels its path on every simulation, so ``label`` is the most frequent command
and its latency the one agents feel. Its work is short (an LMDB read, one WAL record, a
queued transaction); what made it slow under load was the hand-offs of the GIL to and from a
worker thread. So the trio thread writes the label's record itself, awaits the WAL's flush
through a kernel ``fdatasync`` (``kernel_fdatasync.py``; a worker thread's where the kernel
has no AIO), and queues the label's transaction, with the same order and durability as
``LabelApplies.label``.

Group commit: one flush of the WAL from here is in flight at a time; a label whose record it
does not cover waits for it, then starts the next, which covers every record written by then.

The steps after the record is written run shielded from cancellation: a label that took its
place in WAL order must queue its transaction, or every later label would wait for it.
Where a step would block (a gc or checkpoint holds the store, a prune of the snapshot runs,
an earlier label still queueing in a thread) the label goes to a worker thread as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ..crashpoints import crash_point
from ..errors import CascowfsError, from_os_error
from ..label_applies import LoggedLabel, settle_unflushed
from ..metadb import WriteRequest
from ..state import StateManager
from ..wal import WriteAheadLog

Fdatasync = Callable[[], Awaitable[None]]

# A label whose earlier ones are still queueing yields this many times to the tasks that
# queue them (woken by the same flush) before it waits for them in a thread.
_YIELDS_BEFORE_WAITING = 8


class WalGroupFlush:
    """``WriteAheadLog.flush_through`` for trio tasks (module docstring, group commit)."""

    def __init__(self, wal: WriteAheadLog, fdatasync: Fdatasync | None) -> None:
        self._wal = wal
        self._fdatasync: Fdatasync = fdatasync or self._in_thread
        self._in_flight: trio.Event | None = None

    async def _in_thread(self) -> None:
        await trio.to_thread.run_sync(self._wal.flush_through, self._wal.flush_target())

    async def flush_through(self, written: int) -> None:
        while not self._wal.flushed(written):
            if self._in_flight is not None:
                await self._in_flight.wait()
                continue
            self._in_flight = trio.Event()
            target = self._wal.flush_target()
            try:
                await self._fdatasync()
            except OSError as exc:
                raise from_os_error(exc, "syncing the write-ahead log") from exc
            else:
                self._wal.note_flushed(target)
            finally:
                done, self._in_flight = self._in_flight, None
                done.set()


class InlineLabels:
    """``StateManager.label`` on the trio thread (module docstring)."""

    def __init__(self, sm: StateManager, fdatasync: Fdatasync | None) -> None:
        """``fdatasync``: an awaitable flush of the WAL's file (``KernelFdatasync``); None:
        flush in a worker thread."""
        self._sm = sm
        self._flush = WalGroupFlush(sm.wal, fdatasync)

    async def label(self, id: str, changes: dict[str, str]) -> bool:
        """Label snapshot ``id`` as ``StateManager.label`` does; returns whether housekeeping
        is due (``StateManager.housekeep``, off the trio thread)."""
        logged = self._sm.begin_label(id, changes)
        if logged is None:
            await trio.to_thread.run_sync(self._sm.label, id, changes)
            return False
        with trio.CancelScope(shield=True):
            try:
                await self._finish(logged)
            finally:
                due = self._sm.end_label(logged)
        return due

    async def _finish(self, logged: LoggedLabel) -> None:
        flush_error: CascowfsError | None = None
        try:
            await self._flush.flush_through(logged.mark)
        except CascowfsError as exc:
            flush_error = exc
        else:
            crash_point("label.logged")
        request = await self._queue(logged)
        if flush_error is not None:
            await trio.to_thread.run_sync(settle_unflushed, request, flush_error)

    async def _queue(self, logged: LoggedLabel) -> WriteRequest:
        applies = self._sm.label_applies
        for _ in range(_YIELDS_BEFORE_WAITING):
            request = applies.queue(logged, wait=False)
            if request is not None:
                return request
            await trio.sleep(0)
        request = await trio.to_thread.run_sync(applies.queue, logged)
        assert request is not None
        return request
