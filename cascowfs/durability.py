"""When layer files reach the disk: a background syncfs, and a rebuild after a power cut.

The CAS, the records and the write-ahead log are synced before an operation returns. Layer
directories are not: an fsync per file would cost a commit one journal flush per file it wrote,
and layers are a cache the CAS can rebuild. Instead every layer record carries a sequence
number (``seq``); every ``LAYER_SYNC_SECONDS`` (and on a clean close) the store calls
syncfs(2) and then records the highest number the call covered (``layers_synced``). Layers
numbered above that mark may be torn when the page cache is lost (a power cut, a crash of the
kernel, the store's filesystem shut down on a disk error), but by nothing else: after kill -9
the page cache still holds them, and live branch mounts still use them. ``page_cache_id``,
recorded at every open, tells the two apart: it changes with every boot and every mount of the
store's filesystem. A store reopened under another one rebuilds its unsynced layers from the CAS
before mounting anything.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

LAYER_SYNC_SECONDS = 10.0
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

STATX_MNT_ID_UNIQUE = 0x4000  # Linux 6.8: a mount id never reused within a boot
_STATX_MASK_AT, _STATX_MNT_ID_AT, _STATX_SIZE = 0, 144, 256  # offsets in struct statx
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (names created, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Write everything the page cache holds for the filesystem of ``path`` to its disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def page_cache_id(path: Path) -> str:
    """Names the page cache that holds ``path``'s unsynced writes: the boot id, and the unique
    id of the mount ``path`` is on where the kernel has one (else a remount goes unseen)."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    mount = ""
    if _libc.statx(_AT_FDCWD, os.fsencode(path), 0, STATX_MNT_ID_UNIQUE, buf) == 0:
        (mask,) = struct.unpack_from("I", buf.raw, _STATX_MASK_AT)
        if mask & STATX_MNT_ID_UNIQUE:
            (mount_id,) = struct.unpack_from("Q", buf.raw, _STATX_MNT_ID_AT)
            mount = f"/mount {mount_id}"
    return boot_id() + mount


def boot_id() -> str:
    """The kernel's id of this boot ("" where /proc does not say: then no reboot is seen)."""
    try:
        with open(BOOT_ID_PATH) as fh:
            return fh.read().strip()
    except OSError:
        return ""
