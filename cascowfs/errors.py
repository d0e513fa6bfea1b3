"""Precise exceptions raised inside cascowfs.

Every exception carries the errno docs/interface.md (Errors) assigns to it. The FUSE layer
translates them to ``pyfuse3.FUSEError`` exactly once, at its edge; the Python client raises the
same classes from the errno a file call returned, so in-process and file-interface users see one
error vocabulary.
"""

from __future__ import annotations

import errno as _errno
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


def from_os_error(exc: OSError, what: str) -> CascowfsError:
    """Wrap an OSError from the store disk, keeping ENOSPC/EIO distinct for the caller."""
    code = exc.errno or _errno.EIO
    return error_from_errno(code, f"{what}: {exc.strerror or exc}")


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """Raise an OSError of the block as the store error it stands for, naming ``what``."""
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc, what) from exc
