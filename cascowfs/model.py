"""Plain records shared by the engine, the FUSE layer and the client."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a snapshot directory.

    ``ref`` is the content id (32 bytes) of a file, the tree id of a directory, the target of a
    symlink; empty for device nodes, fifos and sockets. ``link`` is non-empty for members of a
    hard-link group inside one snapshot: entries with equal ``link`` are one inode.
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


@dataclass(frozen=True, slots=True)
class BranchInfo:
    name: str
    parent: str | None  # snapshot the branch's changes are counted against
    tree: Path  # the branch's writable overlayfs mount
    created_ns: int
    last_commit: str | None = None


@dataclass(frozen=True, slots=True, order=True)
class Change:
    """One line of ``status`` / ``diff``: ``A``dded, ``M``odified or ``D``eleted path."""

    path: str
    kind: str  # "A" | "M" | "D"

    def line(self) -> str:
        return f"{self.kind} {self.path}"
