"""Precise exceptions raised inside cascowfs.

Every exception carries the errno docs/interface.md (Errors) assigns to it. The FUSE layer
translates them to ``pyfuse3.FUSEError`` exactly once, at its edge; the Python client raises the
same classes from the errno a file call returned, so in-process and file-interface users see one
error vocabulary.

At the client the classes are also ``OSError`` subclasses of the builtin class for their errno
(``os_error_from_errno``): a caller may catch ``NotFoundError`` or ``FileNotFoundError``, as it
would after any file call. Inside the engine they are not, so that an ``except OSError`` around
a disk call never swallows a refusal of the engine's own.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Iterator
from contextlib import contextmanager


class CascowfsError(Exception):
    """Base class: an operation was refused or failed; ``errno`` says how."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFoundError(CascowfsError):
    errno = _errno.ENOENT


class ExistsError(CascowfsError):
    errno = _errno.EEXIST


class InvalidArgumentError(CascowfsError):
    """Bad name, bad id, malformed command."""

    errno = _errno.EINVAL


class BusyError(CascowfsError):
    """Snapshot still in use by a branch, re-base of a modified branch, concurrent commit."""

    errno = _errno.EBUSY


class ReadOnlyError(CascowfsError):
    errno = _errno.EROFS


class NoSpaceError(CascowfsError):
    errno = _errno.ENOSPC


class PermissionDeniedError(CascowfsError):
    errno = _errno.EPERM


class StoreIOError(CascowfsError):
    """The store disk failed (EIO) or holds data that does not verify."""

    errno = _errno.EIO


class XattrTooLargeError(CascowfsError):
    """An xattr that the store's filesystem cannot hold (ext4 without ea_inode keeps about
    4 KiB of xattrs per file, where xfs and tmpfs keep 64 KiB values)."""

    errno = _errno.E2BIG


class FileTooLargeError(CascowfsError):
    """A file larger than a snapshot may hold (``import_workers.MAX_FILE_BYTES``)."""

    errno = _errno.EFBIG


class StoreLockedError(CascowfsError):
    """Another process (a daemon, usually) has the store open."""

    errno = _errno.EBUSY


_BY_ERRNO: dict[int, type[CascowfsError]] = {
    cls.errno: cls
    for cls in (
        NotFoundError,
        ExistsError,
        InvalidArgumentError,
        BusyError,
        ReadOnlyError,
        NoSpaceError,
        PermissionDeniedError,
        StoreIOError,
    )
}


def error_from_errno(code: int, message: str) -> CascowfsError:
    """The exception class for an errno that a file call (or a ctl reply) returned."""
    cls = _BY_ERRNO.get(code, CascowfsError)
    return cls(message, errno=code)


# -- the same errors as a caller of the file interface sees them ------------------------------
class _OSErrorEdge:
    """Mixed in first, before the engine's class and then the builtin one, so that ``.errno``
    resolves to the engine's class attribute (not ``OSError``'s slot) and ``str()`` stays the
    message; ``strerror`` is the errno's text, as for any ``OSError``. (mypy sees ``errno`` typed
    twice, ``int`` here and ``int | None`` in ``OSError``: hence the ignores below.)"""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        CascowfsError.__init__(self, message, errno=errno)  # type: ignore[arg-type]
        object.__setattr__(self, "strerror", os.strerror(getattr(self, "errno")))  # noqa: B009


class NotFoundOSError(_OSErrorEdge, NotFoundError, FileNotFoundError):  # type: ignore[misc]
    pass


class ExistsOSError(_OSErrorEdge, ExistsError, FileExistsError):  # type: ignore[misc]
    pass


class PermissionDeniedOSError(_OSErrorEdge, PermissionDeniedError, PermissionError):  # type: ignore[misc]
    """EPERM (the daemon refused a state change) or EACCES (the kernel's mode check)."""


class InvalidArgumentOSError(_OSErrorEdge, InvalidArgumentError, OSError):  # type: ignore[misc]
    pass


class BusyOSError(_OSErrorEdge, BusyError, OSError):  # type: ignore[misc]
    pass


class ReadOnlyOSError(_OSErrorEdge, ReadOnlyError, OSError):  # type: ignore[misc]
    pass


class NoSpaceOSError(_OSErrorEdge, NoSpaceError, OSError):  # type: ignore[misc]
    pass


class StoreIOOSError(_OSErrorEdge, StoreIOError, OSError):  # type: ignore[misc]
    pass


class OtherOSError(_OSErrorEdge, CascowfsError, OSError):  # type: ignore[misc]
    """An errno without a class of its own (EXDEV, ENOTDIR, ...)."""


class DaemonNotRunningError(_OSErrorEdge, CascowfsError, ConnectionError):
    """The mount point has no live daemon: nothing is mounted there, or the FUSE mount's daemon
    is gone (the kernel answers ENOTCONN), or it died while handling the request
    (ECONNABORTED: the request's outcome is unknown)."""

    errno = _errno.ENOTCONN


_OS_BY_ERRNO: dict[int, type[CascowfsError]] = {
    _errno.ENOENT: NotFoundOSError,
    _errno.EEXIST: ExistsOSError,
    _errno.EPERM: PermissionDeniedOSError,
    _errno.EACCES: PermissionDeniedOSError,
    _errno.EINVAL: InvalidArgumentOSError,
    _errno.EBUSY: BusyOSError,
    _errno.EROFS: ReadOnlyOSError,
    _errno.ENOSPC: NoSpaceOSError,
    _errno.EIO: StoreIOOSError,
    _errno.ENOTCONN: DaemonNotRunningError,
    _errno.ECONNABORTED: DaemonNotRunningError,
}


def os_error_from_errno(code: int, message: str) -> CascowfsError:
    """The client's exception for an errno: the engine's class for it and the builtin
    ``OSError`` subclass Python gives that errno (``FileNotFoundError`` for ENOENT, ...)."""
    cls = _OS_BY_ERRNO.get(code, OtherOSError)
    return cls(message, errno=code)


def from_os_error(exc: OSError, what: str) -> CascowfsError:
    """Wrap an OSError from the store disk, keeping ENOSPC/EIO distinct for the caller."""
    code = exc.errno or _errno.EIO
    name = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes)) else ""
    where = f"{name}: " if name and name not in what else ""  # the file it failed on
    return error_from_errno(code, f"{what}: {where}{exc.strerror or exc}")


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Raise an OSError of the block as the store error it stands for, naming ``what``."""
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc, what) from exc
