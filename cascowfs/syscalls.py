"""Linux system calls Python's ``os`` module has no function for, or none that keeps the GIL
through the call, called by name.

``syscall(2)`` takes a number, and the numbers differ between architectures: they live here
once, for the architectures cascowfs runs on. On another one every call fails with ENOSYS
rather than run whatever system call bears the number elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# The same function, called without releasing the GIL. A thread that releases it for a call
# waits on return until the thread holding it lets go, up to the switch interval, whenever
# others are busy: in a busy daemon that wait is most of what a call of a few microseconds
# costs, and one branch's mount makes a dozen such calls (``overlay.py``).
_libc_keeping_gil = ctypes.PyDLL(None, use_errno=True)
_libc_keeping_gil.syscall.restype = ctypes.c_long

_NUMBERS = {
    "x86_64": {
        # the new mount API (overlay.py)
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        # a walk's lookups that follow no symbolic link (beneath.py)
        "openat2": 437,
        # one thread's credentials (privacy.py)
        "setgroups": 116, "setfsuid": 122, "setfsgid": 123,
        # Linux AIO, and the read of its eventfd (fuse/kernel_fdatasync.py)
        "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "read": 0,
    },
    "aarch64": {
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "openat2": 437, "setgroups": 159, "setfsuid": 151, "setfsgid": 152,
        "io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4, "read": 63,
    },
}  # fmt: skip


_NUMBERS_HERE = _NUMBERS.get(platform.machine())


def raw(name: str, *args: object, keep_gil: bool = False) -> int:
    """What system call ``name`` returns, as the kernel returns it (-1 and ``ctypes``'s errno
    on failure; ``setfsuid`` reports no failure at all). ``keep_gil``: for a call that never
    waits (no I/O, no lock another task holds for long), hold the GIL through it."""
    if _NUMBERS_HERE is None:
        raise OSError(errno.ENOSYS, f"{name}: no system call numbers for {platform.machine()}")
    libc = _libc_keeping_gil if keep_gil else _libc
    return int(libc.syscall(_NUMBERS_HERE[name], *args))


def call(name: str, *args: object, keep_gil: bool = False) -> int:
    """``raw``, with a failure raised as OSError."""
    res = raw(name, *args, keep_gil=keep_gil)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res
