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
opener gets the idle lane. Lanes differ only in their inode number; there are never more of
them than ``ctl`` files open at once, plus one. Two opens racing between lookup and open may
still share a lane; they then run one after the other, as with a single inode.
"""

from __future__ import annotations

from collections.abc import Callable

from .inodes import CtlNode, Node


class CtlLanes:
    """The lanes of ``ctl`` and how many open files each has."""

    def __init__(self, first: CtlNode, allocate: Callable[[], int], parent: Node) -> None:
        self._lanes = [first]
        self._current = first
        self._allocate = allocate
        self._parent = parent

    def for_lookup(self) -> CtlNode:
        """The lane a lookup of ``ctl`` answers with: the last one handed out while nobody has
        it open (so an uncontended open costs one lookup, as for any file), else an idle one."""
        if self._current.opens == 0:
            return self._current
        for lane in self._lanes:
            if lane.opens == 0:
                self._current = lane
                return lane
        lane = CtlNode(self._allocate(), name=b"ctl", parent=self._parent)
        self._lanes.append(lane)
        self._current = lane
        return lane

    @staticmethod
    def opened(lane: CtlNode) -> None:
        lane.opens += 1

    @staticmethod
    def closed(lane: CtlNode) -> None:
        lane.opens -= 1
