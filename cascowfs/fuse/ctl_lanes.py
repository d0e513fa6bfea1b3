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
promise, and a lookup with no open behind it (``stat``) holds a lane for that long at most; a
thread handed another lane gives its earlier one back at once, since a thread opens only what
it looked up last. A lookup that finds no lane free makes one only while fewer than
``MAX_PROMISED`` are promised: past that, it gets the lane promised first, which its opener
may then share.

Any user may hold as many opens of ``ctl`` at once as its fd limits allow (the handle budget
lets one uid hold about 262,000). Lanes used to be kept for good, so such a burst left one
lane per open, uncharged, and every lookup that found the last lane handed out busy went
through all of them on the trio thread, for the rest of the daemon's life. So the daemon
keeps no more lanes than the ``ctl`` files open at once, those promised and ``MAX_IDLE`` idle
ones: a lane whose last file closes while ``MAX_IDLE`` are idle already is dropped. And a
lookup finds its lane in O(1): the last one handed out, the thread's own promise, an idle one,
or the promise that expires first. A dropped lane the kernel still caches stays in the inode
table until the kernel forgets it (``InodeTable.forget``): an open of it (through
``/proc/<pid>/fd``, say) works, and its close makes it idle again if there is room.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .inodes import CtlNode, Node

PROMISE_SECONDS = 1.0  # how long a lane handed out by a lookup waits for its open
MAX_PROMISED = 32  # lanes promised at once; a lookup storm reuses them rather than adding more
MAX_IDLE = 32  # lanes kept with no open file and no promise; one more closed is dropped


class CtlLanes:
    """The lanes of ``ctl``, how many open files each has, and which are promised.

    Only lanes with no open file are kept here: idle ones (``_idle``, in the order they
    became idle) and promised ones (``_promised``, by thread, in the order promised, which
    is the order their promises expire). An open lane is held by its open files' handles
    until the last one closes."""

    def __init__(
        self,
        first: CtlNode,
        allocate: Callable[[], int],
        parent: Node,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._first = first
        self._current = first
        self._idle: dict[CtlNode, None] = {first: None}
        self._promised: OrderedDict[int, CtlNode] = OrderedDict()
        self._allocate = allocate
        self._parent = parent
        self._clock = clock

    @property
    def kept(self) -> int:
        """How many lanes are kept to be handed out again (idle or promised)."""
        return len(self._idle) + len(self._promised)

    def for_lookup(self, pid: int) -> CtlNode:
        """The lane a lookup of ``ctl`` by thread ``pid`` answers with, promised to the open
        that follows: the last one handed out if it is free for ``pid`` (so an uncontended
        open costs one lookup, as for any file), else the one promised to ``pid``, else an
        idle one, else a new one (or, past ``MAX_PROMISED``, the one promised first)."""
        now = self._clock()
        lane = self._current
        if lane.opens or (lane.promised_until > now and lane.promised_to != pid):
            own = self._promised.get(pid)
            lane = own if own is not None and own.promised_until > now else self._spare(now)
            self._current = lane
        self._promise(lane, pid, now)
        return lane

    def _spare(self, now: float) -> CtlNode:
        """A lane no open file uses and no thread was promised, else the lane promised
        first if ``MAX_PROMISED`` are promised, else a new one."""
        promised = self._promised
        while promised:  # promises given the earliest expire first
            pid, lane = next(iter(promised.items()))
            if lane.promised_until > now:
                break
            del promised[pid]
            self._rest(lane)
        if self._idle:
            return self._idle.popitem()[0]
        if len(promised) >= MAX_PROMISED:
            return next(iter(promised.values()))
        return CtlNode(self._allocate(), name=b"ctl", parent=self._parent)

    def _promise(self, lane: CtlNode, pid: int, now: float) -> None:
        self._idle.pop(lane, None)
        if self._promised.get(lane.promised_to) is lane:  # taken from another thread
            del self._promised[lane.promised_to]
        earlier = self._promised.pop(pid, None)
        if earlier is not None and earlier is not lane:
            earlier.promised_until = 0.0  # this thread opens the lane it looked up last
            self._rest(earlier)
        lane.promised_to = pid
        lane.promised_until = now + PROMISE_SECONDS
        self._promised[pid] = lane

    def _rest(self, lane: CtlNode) -> None:
        """``lane`` has no open file and no promise: keep it idle, or drop it if ``MAX_IDLE``
        are (never the first, the pinned ``ctl`` itself)."""
        if len(self._idle) < MAX_IDLE or lane is self._first:
            self._idle[lane] = None

    def opened(self, lane: CtlNode) -> None:
        lane.opens += 1
        lane.promised_until = 0.0
        self._idle.pop(lane, None)
        if self._promised.get(lane.promised_to) is lane:
            del self._promised[lane.promised_to]

    def closed(self, lane: CtlNode) -> None:
        lane.opens -= 1
        if not lane.opens:
            self._rest(lane)
