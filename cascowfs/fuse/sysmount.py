"""Small mount-table helpers for the daemon and the CLI: umount2 via ctypes, FUSE mounts of
cascowfs found through ``overlay.all_mounts`` (the package's one mountinfo parser)."""

from __future__ import annotations

import ctypes
import errno
import os
import urllib.parse
from pathlib import Path

from ..overlay import MountRecord, all_mounts

MNT_FORCE = 1
MNT_DETACH = 2
FUSE_TYPE = "fuse.cascowfs"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


# Characters a store path keeps as they are in the FUSE mount's source; libfuse's option
# parser takes ASCII only and splits at commas, so everything else is percent-encoded.
_SOURCE_SAFE = "/._-+=@:~"


def store_source(store: Path) -> str:
    """The FUSE mount's source (``fsname``, the first column of /proc/mounts) for ``store``.

    The kernel keeps it exactly as long as the mount, and shows it even after the daemon died,
    so ``cascowfs umount --branches`` finds the store of a dead mount from the mount table."""
    return urllib.parse.quote(os.fsencode(store), safe=_SOURCE_SAFE)


def store_of_source(source: str) -> Path | None:
    """The store a FUSE mount's source names (``store_source``), None if it names none."""
    if not source.startswith("/"):
        return None
    return Path(os.fsdecode(urllib.parse.unquote_to_bytes(source)))


def umount2(path: str | Path, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(str(path)), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))


def mount_at(path: str | Path) -> MountRecord | None:
    """The topmost mount whose mount point is exactly ``path`` (no stat: it may be dead)."""
    target = os.path.realpath(str(path))
    found = None
    for entry in all_mounts():
        if entry.target == target:
            found = entry
    return found


_DEAD = (errno.ENOTCONN, errno.ECONNABORTED)


def is_dead(path: str | Path) -> bool:
    """True if ``path`` is a FUSE mount whose daemon is gone ("Transport endpoint ...").

    ``stat`` is not enough: the kernel answers it from its attribute cache for as long as the
    attributes are valid, dead daemon or not. getxattr is never cached, so it always reaches
    the daemon, and a dead connection answers ENOTCONN at once.
    """
    try:
        os.getxattr(path, "user.cascowfs.pid")
    except OSError as exc:
        if exc.errno in _DEAD:
            return True
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno in _DEAD
    return False


def clear_dead_mount(path: str | Path) -> bool:
    """Lazily unmount a dead FUSE mount at ``path``; True if there was one."""
    cleared = False
    while is_dead(path):
        umount2(path, MNT_DETACH)
        cleared = True
    return cleared


def is_cascowfs_mount(path: str | Path) -> bool:
    entry = mount_at(path)
    return entry is not None and entry.fstype == FUSE_TYPE


FUSECTL = Path("/sys/fs/fuse/connections")
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
)


def connection_name(device: str) -> str:
    """The fusectl directory of the FUSE mount on ``device`` (``major:minor`` from the mount
    table): the kernel names it by the superblock's dev_t in its own encoding, minor in the
    low 20 bits (a FUSE mount's major is 0, so in practice the minor)."""
    major, minor = (int(part) for part in device.split(":"))
    return str(major << 20 | minor)


def fuse_mount_at(mnt: str | Path) -> MountRecord | None:
    """The topmost FUSE mount at ``mnt``, found without a system call on ``mnt`` itself: a
    stat of a mount point whose daemon reads no more requests waits for good (only its
    parent directory is resolved)."""
    path = os.path.abspath(str(mnt))
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    fuse = [m for m in all_mounts() if m.target == target and m.fstype.startswith("fuse")]
    return fuse[-1] if fuse else None


def abort_connection(mnt: str | Path) -> bool:
    """Abort the FUSE connection of the mount at ``mnt`` (fusectl, mounted for the call if it
    is not): every request waiting for its daemon fails with ENOTCONN, which frees threads
    that wait in the kernel for those requests. The connection is named by the mount's device
    number, read from the mount table (``fuse_mount_at``). fusectl is mounted
    with mount(2) itself: a mount(8) child would have to be forked from a process whose
    threads are busy, which is when this is called. False if nothing FUSE is mounted there."""
    fuse = fuse_mount_at(mnt)
    if fuse is None:
        return False
    mounted_here = not any(m.fstype == "fusectl" for m in all_mounts())
    if mounted_here and _libc.mount(b"fusectl", bytes(FUSECTL), b"fusectl", 0, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mounting fusectl: {os.strerror(code)}", str(FUSECTL))
    try:
        (FUSECTL / connection_name(fuse.device) / "abort").write_text("1")
    finally:
        if mounted_here:
            try:
                umount2(FUSECTL, MNT_DETACH)
            except OSError:
                pass
    return True
