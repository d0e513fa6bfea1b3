"""Small mount-table helpers for the daemon and the CLI (umount2 via ctypes, /proc/self/mountinfo)."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

MNT_FORCE = 1
MNT_DETACH = 2
FUSE_TYPE = "fuse.cascowfs"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def umount2(path: str | Path, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(str(path)), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    """Every mount of this mount namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) < 5 or len(rf) < 2:
                continue
            out.append(MountEntry(_unescape(lf[4]), rf[0], _unescape(rf[1]),
                                  rf[2] if len(rf) > 2 else ""))
    return out


def mount_at(path: str | Path) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path`` (no stat: it may be dead)."""
    target = os.path.realpath(str(path))
    found = None
    for entry in mounts():
        if entry.mountpoint == target:
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
