"""When layer files reach the disk: a background syncfs, and a rebuild after a power cut.

The CAS, the records and the write-ahead log are synced before an operation returns. Layer
directories are not: an fsync per file would cost a commit one journal flush per file it wrote,
and layers are a cache the CAS can rebuild. Instead every layer record carries a sequence
number (``seq``); every ``LAYER_SYNC_SECONDS`` (and on a clean close) the store calls
syncfs(2) and then records the highest number the call covered (``layers_synced``). Layers
numbered above that mark may be torn by a power cut, but by nothing else: after kill -9 the
page cache still holds them, and live branch mounts still use them. The machine's boot id,
recorded at every open, tells the two apart: a store reopened under another boot id rebuilds
its unsynced layers from the CAS before mounting anything.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

LAYER_SYNC_SECONDS = 10.0
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Write everything the page cache holds for the filesystem of ``path`` to its disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def boot_id() -> str:
    """The kernel's id of this boot ("" where /proc does not say: then no reboot is seen)."""
    try:
        with open(BOOT_ID_PATH) as fh:
            return fh.read().strip()
    except OSError:
        return ""
