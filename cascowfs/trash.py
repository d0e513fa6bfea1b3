"""STORE/trash: whatever is being deleted, deleted in the background.

Removing a directory tree (a discarded branch, a layer no chain names) is renamed into the
trash at once, which is atomic and never fails halfway, and deleted later by the background
thread or by gc. A branch's overlay mount travels with its directory into the trash and is
detached there: tearing down an overlay whose dentries cover a whole tree costs ~0.2 s of the
unmounting thread's time even with MNT_DETACH, and no operation should wait for that.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
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

    def put(self, path: Path) -> None:
        """Move ``path`` into the trash. A path that is not there is ignored, and so is one
        that another thread moves there first: a prune and the layer builder may both drop
        a layer that was being written."""
        try:
            os.rename(path, self.path / f"{secrets.token_hex(6)}-{path.name}")
        except FileNotFoundError:
            if os.path.lexists(path):
                raise  # not the path that went missing: the trash itself
            return
        self._filled.set()

    def put_after_apply(self, paths: list[Path], store: Path) -> None:
        """Move what an applied op dropped into the trash. The op is durable already, so a
        failure here must not fail it: the next open trashes whatever no record names (and
        empties staging, whose leftovers of a failed op come here too)."""
        for path in paths:
            try:
                self.put(path)
            except OSError as exc:
                log.warning("%s: %s stays until the next open: %s", store, path, exc)

    def stop(self) -> None:
        """End a round in progress (the daemon is closing): what it has not deleted stays
        for the next open's round."""
        self._stopping.set()

    def empty(self, *, force: bool = False) -> None:
        """Detach the mounts in the trash and delete it. Every discard queues a round, but a
        round takes all there is: rounds queued meanwhile find nothing new and skip reading
        the mount table (``force``: gc empties it anyway)."""
        with self._lock:  # gc and the background thread may both empty it
            if not (force or self._filled.is_set()):
                return
            self._filled.clear()
            try:
                overlay.unmount_under(self.path)  # never delete through a live mount
                entries = [self.path / e for e in os.listdir(self.path)]
                if entries and not layerfs.remove_trees(entries, self._stopping):
                    self._filled.set()  # stopped: the rest waits for the next open
            except BaseException:
                self._filled.set()  # the next round tries again
                raise
