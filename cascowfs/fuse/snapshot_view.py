"""Read-only snapshot trees as the kernel sees them: attributes, xattrs, link counts.

Snapshots are immutable, so every answer here may be cached by the kernel for as long as it
likes (see ``IMMUTABLE_TIMEOUT``); the only thing that can change is whether a snapshot id exists
at all, which the operations layer handles by invalidating ``snapshots/<id>`` on prune.
"""

from __future__ import annotations

import datetime as _dt
import stat
from collections import Counter, OrderedDict
from collections.abc import Callable

import pyfuse3

from ..fsmeta import RESERVED_XATTR_PREFIX
from ..model import Entry, SnapshotInfo
from ..names import labels_over_limits

# A day: "forever" for a cache, yet bounded so that a forgotten invalidation heals by itself.
IMMUTABLE_TIMEOUT = 86400.0
BLKSIZE = 128 * 1024  # matches the kernel's default max_read, so cp/cat use full-size reads

XATTR_PREFIX = RESERVED_XATTR_PREFIX
# Served on every snapshot directory but not listed (so `getfattr -d` and `diff` of trees stay
# clean): the tree id, which lets tools skip equal subtrees (cascowfs diff over a mount).
TREE_XATTR = XATTR_PREFIX + b"tree"
# Hard-link groups whose counts are kept, over all snapshots: about 30 MB (a group's key and
# its count in a Counter); a tree with more is walked again on each lookup that needs one.
LINK_GROUPS_KEPT = 1 << 18


def entry_attrs(ino: int, entry: Entry, nlink: int = 1) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = ino
    attr.generation = 0
    attr.entry_timeout = IMMUTABLE_TIMEOUT
    attr.attr_timeout = IMMUTABLE_TIMEOUT
    attr.st_mode = entry.mode
    # Directories report 1 like btrfs does: "unknown", which find(1) understands, and it saves
    # reading every subdirectory's listing just to count its children.
    attr.st_nlink = 1 if stat.S_ISDIR(entry.mode) else max(nlink, 1)
    attr.st_uid = entry.uid
    attr.st_gid = entry.gid
    attr.st_rdev = entry.rdev
    attr.st_size = entry.size
    attr.st_blksize = BLKSIZE
    attr.st_blocks = (entry.size + 511) // 512 if stat.S_ISREG(entry.mode) else 0
    attr.st_atime_ns = entry.mtime_ns
    attr.st_mtime_ns = entry.mtime_ns
    attr.st_ctime_ns = entry.mtime_ns
    return attr


def iso_time(ns: int) -> str:
    """RFC 3339 UTC with nanoseconds: readable in a shell, parseable by datetime.fromisoformat."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = _dt.datetime.fromtimestamp(secs, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def entry_xattrs(entry: Entry, info: SnapshotInfo | None) -> dict[bytes, bytes]:
    """What a snapshot entry shows as xattrs: its stored ones, and on a snapshot root (``info``
    given) the recorded metadata. Only cascowfs speaks under ``user.cascowfs.``: commit and
    import strip that namespace, and a tree stored before they did has it hidden here."""
    out = {key: val for key, val in entry.xattrs if not key.startswith(XATTR_PREFIX)}
    if info is not None:
        out.update(root_xattrs(info))
    return out


def root_xattrs(info: SnapshotInfo) -> dict[bytes, bytes]:
    """The ``user.cascowfs.*`` attributes of a snapshot root: what cascowfs recorded
    (docs/interface.md, Snapshots).

    A record with more labels than ``names.check_labels`` admits (a store written before the
    caps) shows ``error`` instead of its labels: listing them could overflow the kernel's
    64 KiB xattr list and fail every ``getfattr -d`` and ``cascowfs ls`` of the store."""
    out: dict[bytes, bytes] = {}
    if info.parent:
        out[XATTR_PREFIX + b"parent"] = info.parent.encode()
    out[XATTR_PREFIX + b"root"] = info.root.encode()
    out[XATTR_PREFIX + b"created"] = iso_time(info.created_ns).encode()
    out[XATTR_PREFIX + b"created_ns"] = str(info.created_ns).encode()
    out[XATTR_PREFIX + b"size"] = str(info.size).encode()
    out[XATTR_PREFIX + b"files"] = str(info.files).encode()
    if info.obs is not None:  # the bytes themselves: MNT/observations/<id>
        out[XATTR_PREFIX + b"obs"] = str(info.obs).encode()
    problem = labels_over_limits(info.labels)
    if problem:
        out[XATTR_PREFIX + b"error"] = f"labels not shown: {problem}".encode()
        return out
    for key, val in sorted(info.labels.items()):
        out[XATTR_PREFIX + b"label." + key.encode()] = val.encode()
    return out


def count_links(root: Entry, read_tree: Callable[[bytes], dict[bytes, Entry]]) -> Counter[bytes]:
    """Members per hard-link group in one snapshot (blocking: walks every directory).

    The tree format stores a group key per entry but not the group size; st_nlink needs it.
    Called at most once per snapshot root, and only for snapshots that have hard links at all.
    """
    counts: Counter[bytes] = Counter()
    stack = [root.ref]
    while stack:
        for entry in read_tree(stack.pop()).values():
            if stat.S_ISDIR(entry.mode):
                stack.append(entry.ref)
            elif entry.link:
                counts[entry.link] += 1
    return counts


class LinkCounts:
    """``count_links`` of the snapshot roots read last, at most ``limit`` groups in all.

    Any user may look up a hard-linked file in every snapshot, and commits make new roots all
    the time: a cache that kept every root's counts grew with each, for as long as the daemon
    ran, and held them after their snapshots were pruned."""

    def __init__(self, limit: int = LINK_GROUPS_KEPT) -> None:
        self.limit = limit
        self.groups = 0
        self._by_root: OrderedDict[bytes, Counter[bytes]] = OrderedDict()

    def get(self, root_ref: bytes) -> Counter[bytes] | None:
        counts = self._by_root.get(root_ref)
        if counts is not None:
            self._by_root.move_to_end(root_ref)
        return counts

    def keep(self, root_ref: bytes, counts: Counter[bytes]) -> None:
        if root_ref in self._by_root:
            return  # two lookups walked it at once
        self._by_root[root_ref] = counts
        self.groups += len(counts)
        while self.groups > self.limit:
            _, old = self._by_root.popitem(last=False)
            self.groups -= len(old)
