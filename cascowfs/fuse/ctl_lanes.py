"""Lanes: many inodes behind the one name ``ctl``, so that commands run side by side.

The kernel runs one ``write(2)`` at a time on a FUSE file's inode (it holds the inode lock for
the whole request) unless the server's open reply asks for parallel direct writes
(``FOPEN_PARALLEL_DIRECT_WRITES``), which libfuse 3.14 and pyfuse3 3.5 have no way to ask for.
A ``ctl`` command is one ``write(2)`` that lasts as long as the command, so with one inode the
agents of a tree search would queue in the kernel behind each other's commands, and the
daemon's group commit would never see two of them at once.

So ``ctl`` is looked up with an entry timeout of 0: every ``open(2)`` of it asks the daemon
again, and the daemon answers with a *lane*, an inode of ``ctl`` that no open file uses, or a
new one if every lane is in use. When the answer differs from the inode the kernel has cached,
the kernel drops that dentry and looks the name up afresh (``fuse_dentry_revalidate``), so the
opener gets the idle lane.

A lookup does not say whether an open follows it. Agents started together look ``ctl`` up
together, before any of them opens it: were an idle lane handed to each, they would all share
one, and each agent's commands would wait for the others' for as long as they keep it open.
So a lane handed out is *promised* to the thread that looked it up (the request's pid) for
``PROMISE_SECONDS``: that thread's lookups get it again (the kernel looks the name up twice when
the lane differs from the inode it had cached), other threads' get another. Its open keeps the
promise, and a lookup with no open behind it (``stat``) holds a lane for that long at most.
Lanes are never more than the ``ctl`` files open at once plus those promised, and at most
``MAX_PROMISED`` are promised: past that, a lookup gets the lane promised first, which its
opener may then share.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .inodes import CtlNode, Node

PROMISE_SECONDS = 1.0  # how long a lane handed out by a lookup waits for its open
MAX_PROMISED = 32  # lanes promised at once; a lookup storm reuses them rather than adding more


class CtlLanes:
    """The lanes of ``ctl``, how many open files each has, and which are promised."""

    def __init__(
        self,
        first: CtlNode,
        allocate: Callable[[], int],
        parent: Node,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lanes = [first]
        self._current = first
        self._allocate = allocate
        self._parent = parent
        self._clock = clock

    def for_lookup(self, pid: int) -> CtlNode:
        """The lane a lookup of ``ctl`` by thread ``pid`` answers with, promised to the open
        that follows: the last one handed out if it is free for ``pid`` (so an uncontended
        open costs one lookup, as for any file), else a free one, else a new one."""
        now = self._clock()
        if not self._free(self._current, now, pid):
            free = [lane for lane in self._lanes if self._free(lane, now, pid)]
            if free:
                self._current = free[0]
            else:
                promised = [lane for lane in self._lanes if lane.promised_until > now]
                if len(promised) >= MAX_PROMISED:
                    self._current = min(promised, key=lambda lane: lane.promised_until)
                else:
                    self._current = CtlNode(self._allocate(), name=b"ctl", parent=self._parent)
                    self._lanes.append(self._current)
        self._current.promised_to = pid
        self._current.promised_until = now + PROMISE_SECONDS
        return self._current

    @staticmethod
    def _free(lane: CtlNode, now: float, pid: int) -> bool:
        return lane.opens == 0 and (lane.promised_until <= now or lane.promised_to == pid)

    @staticmethod
    def opened(lane: CtlNode) -> None:
        lane.opens += 1
        lane.promised_until = 0.0

    @staticmethod
    def closed(lane: CtlNode) -> None:
        lane.opens -= 1
