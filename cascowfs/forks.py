"""What a process forked by the engine must not keep, and how it dies with its parent.

Big imports fan out to forked worker processes (``scan.py``). A fork copies every file
descriptor, and with them what hangs on the open file: the store's ``flock`` and the FUSE
channel. A worker still holding either after its parent was killed keeps the store locked
(the next open fails with "in use") or the dead mount hanging instead of failing with
ENOTCONN. So those descriptors are closed in every child as it is forked, and workers ask the
kernel to kill them when their parent dies: an orphaned pool worker would otherwise wait on
its job queue forever, since its siblings hold the queue's write end open.
"""

from __future__ import annotations

import ctypes
import os
import signal

_close_in_children: set[int] = set()

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def close_in_children(fd: int) -> None:
    """Close ``fd`` in every child forked from now on (until ``forget``)."""
    _close_in_children.add(fd)


def forget(fd: int) -> None:
    """Stop closing ``fd`` in children: call it before the parent closes ``fd``, whose number
    may then be reused for something a child needs."""
    _close_in_children.discard(fd)


def _close_in_child() -> None:
    for fd in _close_in_children:
        try:
            os.close(fd)
        except OSError:
            pass
    _close_in_children.clear()


os.register_at_fork(after_in_child=_close_in_child)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited: there is none, or it is a zombie (which has closed
    its files, and so released whatever lock or pipe they held)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:  # no such process, or it went while we looked
        return True
    except IndexError:
        return False
    return state in (b"Z", b"X")


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this (forked) process when ``parent_pid`` dies.

    The signal is tied to the thread that forked, so fork from a thread that outlives the
    child (a pool used inside a ``with`` block on the calling thread does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:  # the parent died before the request: no signal will come
        os._exit(1)
