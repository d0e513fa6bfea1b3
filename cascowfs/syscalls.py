"""Linux system calls Python's ``os`` module has no function for, called by name.

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

_NUMBERS = {
    "x86_64": {
        # the new mount API (overlay.py)
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        # one thread's credentials (privacy.py)
        "setgroups": 116, "setfsuid": 122, "setfsgid": 123,
        # Linux AIO (fuse/kernel_fdatasync.py)
        "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209,
    },
    "aarch64": {
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "setgroups": 159, "setfsuid": 151, "setfsgid": 152,
        "io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4,
    },
}  # fmt: skip


def raw(name: str, *args: object) -> int:
    """What system call ``name`` returns, as the kernel returns it (-1 and ``ctypes``'s errno
    on failure; ``setfsuid`` reports no failure at all)."""
    numbers = _NUMBERS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"{name}: no system call numbers for {platform.machine()}")
    return int(_libc.syscall(numbers[name], *args))


def call(name: str, *args: object) -> int:
    """``raw``, with a failure raised as OSError."""
    res = raw(name, *args)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res
