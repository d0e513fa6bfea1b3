"""STORE/trash: whatever is being deleted, deleted in the background.

Removing a directory tree (a discarded branch, a layer no chain names) is renamed into the
trash at once, which is atomic and never fails halfway, and deleted later by the background
thread or by gc. A branch's overlay mount travels with its directory into the trash and is
detached there: tearing down an overlay whose dentries cover a whole tree costs ~0.2 s of the
unmounting thread's time even with MNT_DETACH, and no operation should wait for that.

Whoever puts a tree that may hold mounts names their mount points (``mount_points``), and a
round detaches those alone. The mount table is read only where the trash cannot know its
mounts: in the first round after an open (an earlier run's), in gc's, and in the round after
one that left something behind (``rm --one-file-system`` never crosses into a mount, so a
mount nobody named keeps its tree until then). A busy mix asks for a round after every
discard and commit, and reading the mount table each time (every image layer and overlay of
the machine: 0.15–0.6 ms in the 4-agent mix) would be spent on mounts the round was told of.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from . import layers as layerfs
from . import overlay

log = logging.getLogger("cascowfs.trash")


class Trash:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._filled = threading.Event()  # set by put, cleared by empty
        self._filled.set()  # whatever an earlier run left there
        self._stopping = threading.Event()  # set by stop: a round in progress ends early
        self._mount_points: deque[Path] = deque()  # named by put, detached by the next round
        self._mounts_unknown = True  # the next round reads the mount table (an earlier run's)

    def put(self, path: Path, *, mount_points: Iterable[str] = ()) -> None:
        """Move ``path`` into the trash; ``mount_points``: where, relative to ``path``,
        something may be mounted (a branch's tree), for the next round to detach. A path that
        is not there is ignored, and so is one that another thread moves there first: a prune
        and the layer builder may both drop a layer that was being written."""
        target = self.path / f"{secrets.token_hex(6)}-{path.name}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            if os.path.lexists(path):
                raise  # not the path that went missing: the trash itself
            return
        self._mount_points.extend(target / name for name in mount_points)
        self._filled.set()

    def put_after_apply(
        self, paths: list[Path], store: Path, *, mount_points: Iterable[str] = ()
    ) -> None:
        """Move what an applied op dropped into the trash (``mount_points``: as ``put``'s,
        for each path). The op is durable already, so a failure here must not fail it: the
        next open trashes whatever no record names (and empties staging, whose leftovers of
        a failed op come here too)."""
        mount_points = tuple(mount_points)
        for path in paths:
            try:
                self.put(path, mount_points=mount_points)
            except OSError as exc:
                log.warning("%s: %s stays until the next open: %s", store, path, exc)

    def stop(self) -> None:
        """End a round in progress (the daemon is closing): what it has not deleted stays
        for the next open's round."""
        self._stopping.set()

    def empty(self, *, force: bool = False) -> None:
        """Detach the mounts in the trash and delete it. Every discard queues a round, but a
        round takes all there is: rounds queued meanwhile find nothing new and return at once
        (``force``: gc empties it anyway, and reads the mount table for mounts nobody named)."""
        with self._lock:  # gc and the background thread may both empty it
            if not (force or self._filled.is_set()):
                return
            self._filled.clear()
            try:
                entries = [self.path / e for e in os.listdir(self.path)]
                # never delete through a mount: one put after the listing waits for a round
                # with its mounts, and rm never crosses into one it did not hear of
                self._detach_mounts(read_mount_table=force)
                if entries and not layerfs.remove_trees(entries, self._stopping):
                    self._filled.set()  # stopped: the rest waits for the next open
                elif any(os.path.lexists(entry) for entry in entries):
                    self._mounts_unknown = True  # perhaps a mount nobody named holds it
            except BaseException:
                self._mounts_unknown = True
                self._filled.set()  # the next round tries again
                raise

    def _detach_mounts(self, *, read_mount_table: bool) -> None:
        """Detach the mount points named since the last round; and, if asked or if the trash
        may hold mounts nobody named, every mount the mount table shows in it."""
        named = [self._mount_points.popleft() for _ in range(len(self._mount_points))]
        if read_mount_table or self._mounts_unknown:
            self._mounts_unknown = False
            overlay.unmount_under(self.path)
            return
        for mount_point in named:
            overlay.unmount_stacked(mount_point)
