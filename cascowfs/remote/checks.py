"""What a tree pulled from a remote may hold.

A remote is written by other machines: a tree from it is hostile input, held to what this
store's own scans can produce, and to no more privilege than a branch can give itself. A
tree that breaks a rule is refused (EIO naming the remote, the object and the entry)
before any of it is stored:

- names are file names: not empty (but the superroot's one entry), no ``/`` or NUL, not
  ``.`` or ``..``;
- no xattr of overlayfs's (``trusted.overlay.*``) or of cascowfs's (``user.cascowfs.*``):
  scans never record them, and a layer holding them would steer the overlay mounts;
- no device node, and no set-user-id or set-group-id file or directory owned by root: a
  branch runs with what its snapshot's files grant;
- a regular file's size is what its content holds (``file_sizes_hold``, once the pull has
  the content): a snapshot read by the daemon and a layer written from the CAS must agree.
"""

from __future__ import annotations

import stat
from collections.abc import Callable

from ..errors import StoreIOError
from ..fsmeta import OVERLAY_XATTR_PREFIX, RESERVED_XATTR_PREFIX
from ..model import Entry
from ..trees import decode_tree, index_pages

_FORBIDDEN_XATTRS = (OVERLAY_XATTR_PREFIX, RESERVED_XATTR_PREFIX)


def check_pulled_tree(payload: bytes, oid: bytes, *, superroot: bool, where: str) -> list[Entry]:
    """Raise StoreIOError if tree object ``oid`` (its ``payload``) breaks a rule above; its
    regular files, whose sizes the content must hold."""
    if index_pages(payload) is not None:
        return []  # an index of pages: the pages are checked as trees of their own
    try:
        entries = decode_tree(payload)
    except StoreIOError as exc:
        raise StoreIOError(f"{_tree(where, oid)} does not decode: {exc.message}") from None
    if superroot and list(entries) != [b""]:
        raise StoreIOError(f"{_tree(where, oid)} is no snapshot root (one entry, named '')")
    for name, entry in entries.items():
        problem = _problem(name, entry, superroot)
        if problem:
            raise StoreIOError(f"{_entry(where, oid, name)}: {problem}")
    return [entry for entry in entries.values() if stat.S_ISREG(entry.mode)]


def file_sizes_hold(
    files: dict[tuple[bytes, int], tuple[bytes, bytes]],
    size_of: Callable[[bytes], int],
    where: str,
) -> None:
    """Raise StoreIOError unless every file of ``files`` ((content id, size) -> the pulled tree
    and the entry's name that give them) has content of that size, as ``size_of`` reads it
    (StoreIOError for an object of no file content)."""
    for (content_id, size), (tree, name) in files.items():
        try:
            holds = size_of(content_id)
        except StoreIOError as exc:
            raise StoreIOError(f"{_entry(where, tree, name)}: {exc.message}") from None
        if holds != size:
            raise StoreIOError(
                f"{_entry(where, tree, name)}: a file of {size} bytes whose content holds {holds}"
            )


def _tree(where: str, oid: bytes) -> str:
    return f"remote {where}: tree {oid.hex()}"


def _entry(where: str, oid: bytes, name: bytes) -> str:
    return f"{_tree(where, oid)}, entry {name.decode('utf-8', 'backslashreplace')!r}"


def _problem(name: bytes, entry: Entry, superroot: bool) -> str | None:
    if not superroot and (not name or name in (b".", b"..") or b"/" in name or b"\0" in name):
        return "not a file name"
    if superroot and not entry.is_dir:
        return "the root is not a directory"
    if any(key.startswith(_FORBIDDEN_XATTRS) for key, _ in entry.xattrs):
        return "an overlayfs or cascowfs xattr"
    if stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
        return "a device node"
    if (entry.mode & stat.S_ISUID and entry.uid == 0) or (
        entry.mode & stat.S_ISGID and entry.gid == 0 and not entry.is_dir
    ):
        return "set-id and owned by root"
    return None
