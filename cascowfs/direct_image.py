"""An import's layer image written by mkfs.erofs straight from the source, beside the scan.

The usual import writes its layer twice: the scan's workers copy every file into a mirror
directory, and mkfs.erofs turns the finished mirror into the image, alone on one core, once
the scan is done. When the source is a tree nobody is changing, mkfs.erofs can read the
source itself, while the scan reads it for the CAS: no mirror is written or deleted, and the
image is done about when the scan is.

The image is then only as right as the promise that the tree did not change while the two of
them read it, since the snapshot is what the scan read and a branch shows what mkfs.erofs
read. The promise is kept by ctimes, which no caller can set: a tree is *settled* when every
entry's ctime, as the scan sees it and again once mkfs.erofs is done, is older than the import
by ``SETTLED_NS`` (more than any local filesystem's timestamp granularity), so nothing changed
it since the import began, its directories' listings included. Every other tree, and every
entry the scan would not copy as it is, sends the import back to writing the layer from the
CAS (``usable`` says why): an entry changed meanwhile or just before, a filesystem whose
ctimes this module does not trust (network and FUSE filesystems stamp them elsewhere), a mount
inside the tree, an xattr the scan leaves out (overlayfs's own, which a layer's image would
pass on to the overlay, and the reserved ``user.cascowfs.*``). A writer through a shared
memory map that dirtied its page before the import may go on writing unseen (the kernel stamps
the ctime at a page's first write only), as it does for every tool that trusts ctimes.

Only for imports read with the daemon's own rights: mkfs.erofs runs as root, and a caller of
other credentials could not be shown to have been able to read what it reads.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import fsmeta, images, overlay
from .privacy import Caller, held_by

log = logging.getLogger("cascowfs.import")

# How long before an import its source's entries must have last changed.
SETTLED_NS = 2_000_000_000
# Local filesystems whose ctimes the kernel keeps at a fine granularity from its own clock.
TRUSTED_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs", "tmpfs", "f2fs"})


def only_root_moves(src: Path) -> bool:
    """Whether nobody but root may rename or replace ``src`` or a directory on the way to it.

    mkfs.erofs reads the source by its path, and the ctimes checked are the tree's own: a
    user who may write a directory above the source could swap the source for a symbolic
    link to a tree of root's while mkfs.erofs reads, and back, unseen, and the image would
    show root's files where the scan read the user's. A directory on the way is safe if root
    owns it and no one else may write it, or if it is sticky and root owns the next name."""
    path = Path("/")
    for name in src.parts[1:]:
        if not held_by(os.lstat(path), os.lstat(path / name), (0,)):
            return False
        path = path / name
    return True


class DirectImage:
    """The image of one import's source, built by ``building`` while the scan reports each
    entry to ``observe``; ``usable`` says whether it shows what the scan read."""

    def __init__(self, src: Path, image: Path, device: int, cutoff_ns: int) -> None:
        self.src = src
        self.image = image
        self._device = device
        self._cutoff_ns = cutoff_ns
        self._seen: list[tuple[bytes, int, int]] = []  # path, inode, ctime
        self._lock = threading.Lock()
        self._mkfs: subprocess.Popen | None = None
        self._why_not: str | None = None

    @classmethod
    def plan(
        cls, src: Path, image: Path, *, reader: Caller | None, image_mode: str
    ) -> DirectImage | None:
        """A direct image of ``src`` written to ``image``, or None where the import must write
        a mirror: layers are directories here, the caller reads with other rights than the
        daemon's, the source's filesystem is not trusted, or its root changed just now (a
        tree being written, as by a clone that just finished, would fail the check anyway)."""
        if image_mode == images.DIRECTORIES or (reader is not None and reader.uid != 0):
            return None
        cutoff_ns = time.time_ns() - SETTLED_NS
        try:
            st = os.lstat(src)
        except OSError:
            return None  # the scan meets it too, and says so
        holding = overlay.mount_holding(src)
        if st.st_ctime_ns >= cutoff_ns or holding is None:
            return None
        if holding.fstype not in TRUSTED_FILESYSTEMS or not only_root_moves(src):
            return None
        return cls(src, image, st.st_dev, cutoff_ns)

    def observe(self, path: bytes, st: os.stat_result) -> None:
        """The scan met ``path`` (``scan_directory``'s ``seen``)."""
        if self._why_not is not None:
            return
        if st.st_ctime_ns >= self._cutoff_ns:
            self.refuse(f"{os.fsdecode(path)} changed during the import or just before it")
        elif st.st_dev != self._device:
            self.refuse(f"{os.fsdecode(path)} is on another filesystem")
        elif _has_xattrs_left_out(path):
            self.refuse(f"{os.fsdecode(path)} has xattrs a snapshot leaves out")
        else:
            self._seen.append((path, st.st_ino, st.st_ctime_ns))
            return
        self._seen.clear()

    def refuse(self, why: str) -> None:
        """Give up the direct image (the first reason is kept), stopping mkfs.erofs."""
        with self._lock:
            if self._why_not is None:
                self._why_not = why
            if self._mkfs is not None:
                self._mkfs.kill()

    @contextmanager
    def building(self) -> Iterator[None]:
        """mkfs.erofs writes the image on a thread of its own while the block runs (the scan,
        then the encoding of its trees); the block's end waits for it."""

        def build() -> None:
            try:
                images.build(self.src, self.image, compress=True, started=self._started)
            except Exception as exc:  # a plain StoreIOError, or one the kill caused
                self.refuse(str(exc))

        thread = threading.Thread(target=build, name="cascowfs-direct-image", daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            self.refuse("the import failed")
            raise
        finally:
            thread.join()

    def _started(self, mkfs: subprocess.Popen) -> None:
        with self._lock:
            self._mkfs = mkfs
            if self._why_not is not None:
                mkfs.kill()

    def usable(self, unfit: list[str]) -> bool:
        """After ``building``: True if the image shows exactly what the scan read, checked
        by a last ``lstat`` of every entry; else the image is deleted, the reason logged, and
        the layer must be written from the CAS. ``unfit``: what the scan found that no image
        may hold (``images.why_not_an_entry``)."""
        if unfit:
            self.refuse(unfit[0])
        for path, inode, ctime_ns in self._seen:
            if self._why_not is not None:
                break
            try:
                st = os.lstat(path)
            except OSError:
                self.refuse(f"{os.fsdecode(path)} went during the import")
                break
            if (st.st_ino, st.st_ctime_ns) != (inode, ctime_ns):
                self.refuse(f"{os.fsdecode(path)} changed during the import")
        if self._why_not is None:
            log.info("import of %s: its layer's image was written from the source", self.src)
            return True
        log.info("import of %s: %s; its layer is written from the store", self.src, self._why_not)
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass
        return False


def _has_xattrs_left_out(path: bytes) -> bool:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False  # none, or none readable: the scan meets the same
    return any(
        key.startswith((fsmeta.OVERLAY_XATTR_PREFIX, fsmeta.RESERVED_XATTR_PREFIX))
        for key in map(os.fsencode, names)
    )
