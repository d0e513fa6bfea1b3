"""Reading and restoring the metadata a snapshot keeps: mode, owner, mtime (ns), xattrs."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from . import extents
from .cas import Piece
from .errors import XattrTooLargeError

OVERLAY_XATTR_PREFIX = b"trusted.overlay."
# cascowfs's own namespace: a snapshot root serves its recorded metadata under it, so a tree's
# own xattrs there (set inside a branch, or copied by `cp -a` from a snapshot) are never kept.
RESERVED_XATTR_PREFIX = b"user.cascowfs."


def read_xattrs(target: str | bytes | int) -> tuple[tuple[bytes, bytes], ...]:
    """Every xattr of ``target`` (a path, not following symlinks, or an open descriptor),
    sorted, overlayfs's own and the reserved ``user.cascowfs.*`` left out."""
    return read_xattrs_and_overlay_keys(target)[0]


def read_xattrs_and_overlay_keys(
    target: str | bytes | int,
) -> tuple[tuple[tuple[bytes, bytes], ...], frozenset[bytes]]:
    """``read_xattrs``, and the names of overlayfs's own xattrs that ``target`` has (so that a
    walk of an upper directory reads those values only where they exist). Every snapshot's
    xattrs are read here, on import and on commit: the one place that strips the reserved
    namespace."""
    follow = isinstance(target, int)  # a descriptor is the file itself: nothing to follow
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return (), frozenset()
        raise
    out = []
    overlay = []
    for name in names:
        key = name.encode("utf-8", "surrogateescape")
        if key.startswith(OVERLAY_XATTR_PREFIX):
            overlay.append(key)
            continue
        if key.startswith(RESERVED_XATTR_PREFIX):
            continue
        try:
            out.append((key, os.getxattr(target, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    out.sort()
    return tuple(out), frozenset(overlay)


# Below this much free space an ENOSPC from setxattr is taken for a full disk.
_FULL_DISK_BYTES = 1 << 20


def set_xattrs(
    target: str | bytes | int,
    xattrs: tuple[tuple[bytes, bytes], ...],
    shown: str | bytes | None = None,
) -> None:
    """Set ``xattrs`` on ``target`` (a path, not following symlinks, or an open descriptor;
    ``shown`` names a descriptor's file in errors).

    ext4 answers ENOSPC for an xattr that does not fit its one xattr block even when the disk
    has room: that is XattrTooLargeError (E2BIG) naming the file and the xattr, so that an
    import of a tree from xfs or tmpfs says what to fix instead of "disk full"."""
    follow = isinstance(target, int)
    for key, value in xattrs:
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.E2BIG) or _disk_full(target):
                raise
            if shown is not None:
                name = os.fsdecode(shown)
            else:
                name = f"descriptor {target}" if isinstance(target, int) else os.fsdecode(target)
            raise XattrTooLargeError(
                f"{name}: xattr {key.decode('utf-8', 'backslashreplace')} ({len(value)} bytes) "
                f"does not fit the store's filesystem ({exc.strerror}); remove it or keep the "
                f"store on a filesystem that holds large xattrs (xfs, ext4 with ea_inode)"
            ) from None


def _disk_full(target: str | bytes | int) -> bool:
    try:
        st = (
            os.fstatvfs(target)
            if isinstance(target, int)
            else os.statvfs(os.path.dirname(os.path.abspath(target)))
        )
    except OSError:
        return True
    return st.f_bavail * st.f_frsize < _FULL_DISK_BYTES


def get_overlay_xattr(target: str | bytes | int, key: bytes) -> bytes | None:
    """The value of xattr ``key`` of ``target`` (a path, not following symlinks, or an open
    descriptor); None where it has none."""
    follow = isinstance(target, int)  # a descriptor is the file itself: nothing to follow
    try:
        return os.getxattr(target, key, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def apply_metadata(
    path: str | bytes,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    xattrs: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """Give ``path`` (already created) exactly this metadata; mtime last, since the others
    do not change it but xattrs on a directory's children would have."""
    is_link = stat.S_ISLNK(mode)
    os.chown(path, uid, gid, follow_symlinks=False)
    if not is_link:
        os.chmod(path, stat.S_IMODE(mode))  # after chown, which clears set-id bits
    set_xattrs(path, xattrs)
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def write_file(
    dst: str | bytes,
    content: bytes | Iterable[Piece],
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    xattrs: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """Create ``dst`` (it must not exist) with ``content`` (bytes, or a stream of pieces
    whose holes stay holes) and exactly this metadata, all through the descriptor that wrote
    it: an import writes ~80k such files, and each path call would resolve the path again."""
    fd = create_file(dst)
    try:
        extents.write_pieces(fd, [content] if isinstance(content, bytes) else content)
        finish_file(fd, mode, uid, gid, mtime_ns, xattrs, shown=dst)
    finally:
        os.close(fd)


def create_file(dst: str | bytes) -> int:
    """A descriptor of the new file ``dst`` (it must not exist), for ``finish_file``."""
    return os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def finish_file(
    fd: int,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    xattrs: tuple[tuple[bytes, bytes], ...] = (),
    shown: str | bytes | None = None,
) -> None:
    """Give the file written through ``fd`` (named ``shown`` in errors) exactly this
    metadata."""
    os.fchown(fd, uid, gid)
    os.fchmod(fd, stat.S_IMODE(mode))  # after chown, which clears set-id bits
    set_xattrs(fd, xattrs, shown)
    os.utime(fd, ns=(mtime_ns, mtime_ns))  # last: writes and xattrs change the times


def open_file(path: str | bytes) -> int:
    """A read descriptor of the file ``path`` (a symlink is refused with ELOOP, not
    followed); its content is read as a stream (``extents.read_pieces``), never whole.

    Opened without blocking: a FIFO swapped in for the file since it was seen would wait for a
    writer for good, and the operation with it. The reader (``import_workers.read_content``)
    refuses anything but the regular file it expects, and reads it blocking."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)


def make_node(path: str | bytes, mode: int, rdev: int) -> None:
    """Device node, fifo or socket."""
    os.mknod(path, stat.S_IFMT(mode) | 0o600, rdev)
