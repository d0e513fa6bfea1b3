"""Plain records shared by the engine, the FUSE layer and the client."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .errors import InvalidArgumentError
from .pathquote import path_bytes, path_text, quote, unquote


class Entry(NamedTuple):
    """One name in a snapshot directory.

    ``ref`` is the content id (32 bytes) of a file, the tree id of a directory, the target of a
    symlink; empty for device nodes, fifos and sockets. ``link`` is non-empty for members of a
    hard-link group inside one snapshot: entries with equal ``link`` are one inode.

    A named tuple, not a frozen dataclass: as immutable, and made 4x faster (0.85 against
    3.6 us), which is most of decoding a listing (a 1,500-entry directory took 11 ms). A new
    version is made with ``_replace``.
    """

    name: bytes
    mode: int  # full st_mode, type bits included
    uid: int
    gid: int
    mtime_ns: int
    size: int
    ref: bytes = b""
    rdev: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    link: bytes = b""
    tree_files: int = 0  # directories: regular files below (each hard link counted)
    tree_bytes: int = 0  # directories: logical bytes of those files
    tree_links: int = 0  # directories: entries below that belong to a hard-link group

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    id: str
    root: str  # hex digest of the root tree: the snapshot's integrity digest
    parent: str | None
    created_ns: int
    size: int  # logical bytes of regular files
    files: int
    labels: dict[str, str] = field(default_factory=dict)
    # Set by the client when the mount cannot show the record whole (labels beyond the caps,
    # written by an older version): the labels are then left out.
    error: str | None = None
    obs: int | None = None  # bytes of the large observation stored beside it (None: none)


@dataclass(frozen=True, slots=True)
class BranchInfo:
    name: str
    parent: str | None  # snapshot the branch's changes are counted against
    tree: Path  # the branch's writable overlayfs mount
    created_ns: int
    last_commit: str | None = None


CHANGE_KINDS = "AMD"  # added, modified, deleted


@dataclass(frozen=True, slots=True, order=True)
class Change:
    """One line of ``status`` / ``diff``: ``A``dded, ``M``odified or ``D``eleted path.

    ``path`` is the exact name: a str decoded from UTF-8 with ``surrogateescape``, so bytes
    that are not UTF-8 survive (``raw_path`` gives them back).
    """

    path: str
    kind: str  # "A" | "M" | "D"

    @property
    def raw_path(self) -> bytes:
        return path_bytes(self.path)

    def line(self) -> str:
        """``<kind> <path>`` with the path quoted (``pathquote``): one line whatever the name."""
        return f"{self.kind} {quote(self.path)}"

    def record_z(self) -> bytes:
        """``<kind> <raw path>\\0``: the NUL-terminated form (``status -z``)."""
        return self.kind.encode() + b" " + self.raw_path + b"\0"

    @classmethod
    def from_line(cls, line: str) -> Change:
        """Parse what ``line()`` wrote."""
        if len(line) < 3 or line[0] not in CHANGE_KINDS or line[1] != " ":
            raise InvalidArgumentError(f"malformed change line {line!r}")
        return cls(path_text(unquote(line[2:])), line[0])

    @classmethod
    def from_record_z(cls, record: bytes) -> Change:
        """Parse one ``record_z()`` without its NUL."""
        if len(record) < 3 or chr(record[0]) not in CHANGE_KINDS or record[1:2] != b" ":
            raise InvalidArgumentError(f"malformed change record {record!r}")
        return cls(path_text(record[2:]), chr(record[0]))
