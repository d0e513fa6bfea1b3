"""``fdatasync`` awaited on the trio thread, with no thread of our own: Linux AIO's
``IOCB_CMD_FDSYNC`` (Linux 4.18 and later) runs it in a kernel worker and signals an eventfd,
which trio's event loop waits on like any socket.

Why not ``trio.to_thread``: a worker thread has to take the GIL to start, again when its
``fdatasync`` returns, and the trio thread once more to go on. On a daemon whose threads keep
the GIL busy, those hand-offs cost more than the flush itself (docs/architecture.md,
*Decisions*). Here only the trio thread runs Python code.

One flush at a time per ``KernelFdatasync`` (its caller serializes them): the eventfd and the
completion ring then hold at most one event, which needs no matching of events to waiters.

The trio thread keeps the GIL through the calls that start a flush and take its completion
(``io_submit``, which only queues the flush; ``io_getevents`` without waiting; the read of the
non-blocking eventfd): each would otherwise give it up and wait to get it back behind the
daemon's busy threads, longer than the call itself takes.
"""

from __future__ import annotations

import ctypes
import logging
import os

import trio

from .. import syscalls

log = logging.getLogger("cascowfs.fuse")

_IOCB_CMD_FDSYNC = 3
_IOCB_FLAG_RESFD = 1


class _Iocb(ctypes.Structure):
    """``struct iocb`` of linux/aio_abi.h (little-endian: aio_key before aio_rw_flags)."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class KernelFdatasync:
    """``fdatasync(fd)`` for the trio thread (module docstring). ``open`` says whether this
    kernel and filesystem can; ``close`` once no flush is in flight."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._ctx = ctypes.c_ulong(0)
        self._count = ctypes.c_uint64(0)  # where the eventfd's count is read to
        syscalls.call("io_setup", 1, ctypes.byref(self._ctx))
        try:
            self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            syscalls.call("io_destroy", self._ctx)
            raise

    @classmethod
    def open(cls, fd: int) -> KernelFdatasync | None:
        """One for ``fd`` once a flush of it went through, or None where the kernel has no
        AIO (or no AIO flush for this filesystem): then flush in a worker thread."""
        try:
            flusher = cls(fd)
        except OSError as exc:
            log.info("no kernel AIO here (%s): labels flush the WAL in worker threads", exc)
            return None
        try:
            flusher._submit()
            flusher._reap(block=True)
            flusher._take_signal()  # its signal, taken with it
        except OSError as exc:
            log.info("no AIO fdatasync here (%s): labels flush the WAL in worker threads", exc)
            flusher.close()
            return None
        return flusher

    async def __call__(self) -> None:
        """One ``fdatasync`` of the file; OSError as ``os.fdatasync`` raises it."""
        self._submit()
        while True:
            await trio.lowlevel.wait_readable(self._eventfd)
            if not self._take_signal():
                continue
            if self._reap(block=False):
                return

    def _take_signal(self) -> bool:
        """Read the eventfd's count, holding the GIL: False if nothing signalled it."""
        try:
            syscalls.call("read", self._eventfd, ctypes.byref(self._count), 8, keep_gil=True)
        except BlockingIOError:
            return False
        return True

    def _submit(self) -> None:
        iocb = _Iocb(
            aio_lio_opcode=_IOCB_CMD_FDSYNC,
            aio_fildes=self._fd,
            aio_flags=_IOCB_FLAG_RESFD,
            aio_resfd=self._eventfd,
        )
        # the kernel copies the iocb in io_submit: it need not outlive the call
        iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(iocb))
        syscalls.call("io_submit", self._ctx, 1, iocbs, keep_gil=True)

    def _reap(self, *, block: bool) -> bool:
        """Take the flush's completion: True once taken (OSError if it failed), False if it
        is not there yet (``block``: wait for it)."""
        event = (_IoEvent * 1)()
        timeout = None if block else ctypes.byref(_Timespec(0, 0))
        while True:
            try:
                got = syscalls.call(
                    "io_getevents", self._ctx, 1, 1, event, timeout, keep_gil=not block
                )
            except InterruptedError:
                continue
            break
        if got == 0:
            return False
        if event[0].res < 0:
            err = -event[0].res
            raise OSError(err, os.strerror(err))
        return True

    def close(self) -> None:
        """Free the AIO context (the kernel waits for a flush still in flight) and eventfd."""
        try:
            syscalls.call("io_destroy", self._ctx)
        finally:
            os.close(self._eventfd)
