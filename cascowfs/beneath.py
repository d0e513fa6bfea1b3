"""Open a directory below a walk's top without following a symbolic link on the way.

A commit walks a branch's upper directory while the agent may still be working in it, and
an import walks a source its owner may be changing; both walks run as root. A walk that
names what it lists by full path follows whatever the path holds at each call: an agent
that swaps one of its directories for a symbolic link to ``/root`` (``renameat2`` with
``RENAME_EXCHANGE``, atomically and again and again) makes a listing, and the ``lstat`` of
each name in it, happen in ``/root``, and the files found there are then read as the
branch's own. Checking each file's (device, inode) at its read does not help when the walk's
``lstat`` went through the same link.

So a walk holds its top open and reaches every directory below it from there with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: the kernel refuses a path that has a
symbolic link anywhere in it, or leaves the top. The directory opened must then be the one
the walk's listing saw (``identity``: its device and inode, and the mode and owner the walk
records); names in it are looked up relative to that descriptor. What the walk records is
therefore what lies below its top, and a read by path that insists on the identity the walk
found reads that very file. Where ``openat2`` is missing
(Linux before 5.6, or a system call filter that refuses it), the path is opened one name at
a time with ``O_NOFOLLOW``, each relative to the last: the same guarantee, at one open per
level.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

from . import syscalls
from .errors import BusyError
from .pathquote import quote

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
# What a path with a symbolic link (or a file where a directory was) on the way gives.
_SWAPPED = (errno.ELOOP, errno.ENOTDIR, errno.EXDEV)


# (device, inode, mode, uid, gid) of a file a walk's ``lstat`` found
Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    """What makes a file the one a walk recorded: its inode, and the mode and owner the walk
    records with its content. The inode number alone is not enough: a file deleted and
    another created at its name may get the number back at once (ext4 hands it out again),
    and an agent that frees a root-owned set-user-id file's number after the walk's
    ``lstat`` and takes it back for a file of its own would have its bytes recorded under
    root's mode and owner. A file the agent creates is the agent's: it cannot match them."""
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def open_top(path: bytes, seen: os.stat_result) -> int:
    """The walk's top, ``path``, open as a directory: the one its ``lstat`` gave as ``seen``
    (a symbolic link there is not followed). BusyError otherwise."""
    try:
        fd = os.open(path, _DIRECTORY_FLAGS | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in _SWAPPED:
            raise replaced(path) from None
        raise
    return _checked(fd, seen, path)


def open_below(top: int, rel: bytes, seen: os.stat_result, shown: bytes) -> int:
    """Directory ``rel`` (relative, ``/``-separated; empty for the top itself) below the open
    directory ``top``, reached through no symbolic link, and the one the walk saw there
    (``seen``, its ``lstat``); BusyError naming ``shown`` if not."""
    try:
        if not rel:
            fd = os.open(".", _DIRECTORY_FLAGS, dir_fd=top)
        elif _openat2_works():
            fd = _openat2(top, rel)
        else:
            fd = _open_name_by_name(top, rel)
    except OSError as exc:
        if exc.errno in _SWAPPED:
            raise replaced(shown) from None
        raise
    return _checked(fd, seen, shown)


def at(directory: int, name: bytes) -> bytes:
    """A path naming ``name`` in the open ``directory``, for the calls that take no
    directory descriptor (``lgetxattr``, ``llistxattr``): the kernel resolves
    ``/proc/self/fd/N`` to that very directory, whatever its path holds now."""
    return b"/proc/self/fd/%d/%s" % (directory, name)


def _checked(fd: int, seen: os.stat_result, shown: bytes) -> int:
    if identity(os.fstat(fd)) != identity(seen):
        os.close(fd)
        raise replaced(shown)
    return fd


def replaced(shown: bytes) -> BusyError:
    """The error of a walk that found something else at ``shown`` than it saw there."""
    return BusyError(f"{quote(shown)}: replaced since the walk saw it; try again once it rests")


def _openat2(top: int, rel: bytes) -> int:
    how = _OpenHow(_DIRECTORY_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
    res = syscalls.raw(
        "openat2", ctypes.c_int(top), ctypes.c_char_p(rel), ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )  # fmt: skip
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(rel))
    return res


def _open_name_by_name(top: int, rel: bytes) -> int:
    fd = os.dup(top)
    try:
        for name in rel.split(b"/"):
            below = os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


@functools.cache
def _openat2_works() -> bool:
    """Whether this kernel, and any system call filter, lets ``openat2`` through: found out
    at the first call."""
    root = os.open("/", _DIRECTORY_FLAGS)
    try:
        os.close(_openat2(root, b"."))
    except OSError:  # ENOSYS, or EPERM from a system call filter
        return False
    finally:
        os.close(root)
    return True
