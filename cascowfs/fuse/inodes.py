"""The inode table of the FUSE layer: which nodeid means what, and how long we remember it.

Three ranges of inode numbers, chosen so that they can never collide with each other:

* ``1 .. 15``: the fixed skeleton (mount root, ``ctl``, ``snapshots/``, ``branches/``,
  ``episodes``, ``observations/``).
  Further lanes of ``ctl`` (``ctl_lanes``) are allocated like the range below.
* ``16 .. 2**52 - 1``: allocated from a counter that never goes back, for every directory of a
  snapshot (unique per (snapshot, path), because the kernel must never see one directory nodeid
  under two parents) and for the control-plane nodes of branches. Never reused within one daemon
  run, so a stale nodeid the kernel still holds can never name a different object.
* ``2**52 .. 2**53 - 1``: derived from a keyed hash of everything that makes a non-directory
  entry what it is to a reader (content id, mode, owner, mtime, size, xattrs, hard-link key,
  link count). Identical files in different snapshots therefore have the *same* nodeid, and the
  kernel keeps one page cache for them; the members of a hard-link group are one inode. Derived
  numbers stay below 2**53 so that runtimes which keep ``st_ino`` in a double (JavaScript) see
  exact values. A 52-bit hash collision between two different keys that are both known to the
  kernel at the same time is detected (we keep the key of every live hashed node) and the
  newcomer falls back to an allocated number.

The hash is keyed (BLAKE2b) with a secret each table draws at random, so with each mount: any
user who may list a directory sees its files' numbers (``st_ino``, ``d_ino``), even of a 0600
file of root's, and an unkeyed hash of the content id would let them confirm guesses of the
content offline (a 4-digit PIN in 10,000 tries). Nothing needs the numbers beyond one mount:
the kernel forgets every nodeid with its mount, ``Client.diff`` compares numbers of one mount,
and no store record holds one. Within a mount, equal numbers still tell a lister that two
files are identical in content and every attribute: that is the page-cache sharing above.

Lookup counts follow the FUSE protocol: ``lookup``/``readdirplus``/``mkdir`` increment, ``forget``
decrements; a node whose count reaches zero is dropped unless it is pinned (the skeleton), and
so is one made for a ``readdir`` entry the kernel did not take (``unlisted``).
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..model import Entry

ROOT_INO = 1
CTL_INO = 2
SNAPSHOTS_INO = 3
BRANCHES_INO = 4
EPISODES_INO = 10
OBSERVATIONS_INO = 11
FIRST_ALLOCATED = 16
HASHED_BASE = 1 << 52
HASHED_MASK = HASHED_BASE - 1
SECRET_BYTES = 32  # BLAKE2b's largest key

_LEAF_FIXED = struct.Struct("<IIIqQQI")
PinnedNode = TypeVar("PinnedNode", bound="Node")


@dataclass(eq=False, slots=True)
class Node:
    """Something the kernel knows by a nodeid."""

    ino: int
    lookups: int = 0
    pinned: bool = False
    # Directory-like nodes remember the nodeids of the children they handed out so that a second
    # lookup of the same name returns the same nodeid (required for directories).
    parent: Node | None = None
    name: bytes = b""


@dataclass(eq=False, slots=True)
class SkeletonNode(Node):
    """Mount root, ``ctl``, ``snapshots/`` and ``branches/``."""

    children: dict[bytes, Node] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class CtlNode(Node):
    """``ctl``, or one of its lanes (see ``ctl_lanes``): ``opens`` counts its open files;
    a lookup by thread ``promised_to`` handed it out, and it waits for that thread's open
    until ``promised_until``. A lane ``ctl_lanes`` dropped lives here like any node: until
    the kernel forgets it."""

    opens: int = 0
    promised_to: int = 0
    promised_until: float = 0.0


@dataclass(eq=False, slots=True)
class GeneratedFileNode(Node):
    """A read-only file of the skeleton whose content is generated at open (``episodes``)."""


@dataclass(eq=False, slots=True)
class SnapDirNode(Node):
    """A directory inside a snapshot (the snapshot root included: then ``name`` is its id)."""

    snap: str = ""
    entry: Entry | None = None
    # Validity key of a snapshot root: (created_ns, root digest). A snapshot id that was pruned
    # and re-created names another tree, so it must get another nodeid.
    version: tuple = ()
    root_ref: bytes = b""  # tree id of the snapshot root, for hard-link counting
    info: Any = None  # SnapshotInfo of a snapshot root (its xattrs); None below the root
    children: dict[bytes, Node] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class SnapLeafNode(Node):
    """A non-directory entry of a snapshot; shared by every snapshot that holds the same file."""

    entry: Entry | None = None
    nlink: int = 1
    key: bytes = b""


@dataclass(eq=False, slots=True)
class BranchDirNode(Node):
    """``branches/<name>/``."""

    branch: str = ""
    created_ns: int = 0
    children: dict[bytes, Node] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class BranchFileNode(Node):
    """``tree``, ``parent``, ``commit``, ``status`` or ``status.z`` inside ``branches/<name>/``."""

    branch: str = ""
    which: str = ""


def leaf_key(entry: Entry, nlink: int) -> bytes:
    """Canonical bytes of everything a reader can observe about a non-directory entry."""
    parts = [
        _LEAF_FIXED.pack(
            entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.size, entry.rdev, nlink
        ),
        struct.pack("<H", len(entry.ref)),
        entry.ref,
        struct.pack("<H", len(entry.link)),
        entry.link,
    ]
    for key, val in entry.xattrs:
        parts += [struct.pack("<HI", len(key), len(val)), key, val]
    return b"".join(parts)


class InodeTable:
    """nodeid -> Node, with the lookup-count bookkeeping of the FUSE protocol.

    Only ever touched from the trio thread, so it needs no lock. ``secret`` keys the leaves'
    derived numbers (see the module docstring); a fresh random one when None.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self._mac = hashlib.blake2b(
            key=secrets.token_bytes(SECRET_BYTES) if secret is None else secret, digest_size=8
        )
        self._nodes: dict[int, Node] = {}
        self._next = FIRST_ALLOCATED
        # key -> allocated nodeid for leaves whose hashed number was taken by another key.
        self._collided: dict[bytes, int] = {}
        self.collisions = 0

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def add_pinned(self, node: PinnedNode) -> PinnedNode:
        node.pinned = True
        self._nodes[node.ino] = node
        return node

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def allocate(self) -> int:
        ino = self._next
        self._next += 1
        return ino

    def register(self, node: Node) -> Node:
        """Make an allocated node known (it may have been dropped and come back via ``..``)."""
        self._nodes[node.ino] = node
        return node

    def leaf(self, entry: Entry, nlink: int) -> SnapLeafNode:
        """The node for a non-directory snapshot entry (shared between equal entries)."""
        key = leaf_key(entry, nlink)
        ino = self._derived(key)
        node = self._nodes.get(ino)
        if node is None:
            node = SnapLeafNode(ino, entry=entry, nlink=nlink, key=key)
            self._nodes[ino] = node
            return node
        if isinstance(node, SnapLeafNode) and node.key == key:
            return node
        # A different file hashes to the same number: never let the kernel confuse the two.
        alt = self._collided.get(key)
        if alt is not None and alt in self._nodes:
            return self._nodes[alt]  # type: ignore[return-value]
        self.collisions += 1
        alt = self.allocate()
        self._collided[key] = alt
        node = SnapLeafNode(alt, entry=entry, nlink=nlink, key=key)
        self._nodes[alt] = node
        return node

    def _derived(self, key: bytes) -> int:
        """The hashed number of a leaf key: 0.8 µs with the keyed MAC copied (keying anew
        costs 1.7 µs, an unkeyed xxh3 0.15 µs)."""
        mac = self._mac.copy()
        mac.update(key)
        return HASHED_BASE | (int.from_bytes(mac.digest(), "little") & HASHED_MASK)

    def child(self, parent: Node, name: bytes) -> Node | None:
        """A directory-like child remembered under ``parent`` (None if unknown or dropped)."""
        children = getattr(parent, "children", None)
        if children is None:
            return None
        node = children.get(name)
        if node is not None and self._nodes.get(node.ino) is not node:
            # Dropped by forget meanwhile; the caller builds a fresh node.
            del children[name]
            return None
        return node

    def adopt(self, parent: Node, name: bytes, node: Node) -> Node:
        """Record ``node`` as the child ``name`` of ``parent`` and make it known."""
        node.parent = parent
        node.name = name
        parent.children[name] = node  # type: ignore[attr-defined]
        self._nodes[node.ino] = node
        return node

    def detach(self, parent: Node, name: bytes) -> bool:
        """Forget the name -> node association (the object is gone); the node lives on until
        the kernel forgets it, so open files and cwds keep working on what they had. Returns
        whether the kernel may still cache the name: only a name it looked up (or listed
        with readdirplus) and has not forgotten has a node here."""
        known = self.child(parent, name) is not None
        children = getattr(parent, "children", None)
        if children is not None:
            children.pop(name, None)
        return known

    def looked_up(self, node: Node, count: int = 1) -> None:
        node.lookups += count
        if node.ino not in self._nodes:
            self._nodes[node.ino] = node

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None:
            return
        node.lookups -= count
        if node.lookups > 0 or node.pinned:
            node.lookups = max(node.lookups, 0)
            return
        node.lookups = 0
        self._drop(node)

    def unlisted(self, node: Node) -> None:
        """``node`` was made for a ``readdir`` entry that did not fit the reply: drop it
        unless the kernel knows it from elsewhere (a lookup count) or it is pinned. The
        kernel forgets only the nodeids it was given, so a node it never saw would stay for
        good: a directory's with its parents, a snapshot root's with its labels, one a
        listing (any user's ``getdents`` at any offset) for each page it filled.

        Only a snapshot's nodes go: no request waits between making one and counting it
        (``lookup``) or replying it (``readdir``), so one with no lookups is not one another
        request is about to hand out. A branch file's attributes are read in a thread, so a
        lookup may be waiting between the two; those are a few per branch, kept."""
        if (
            isinstance(node, SnapLeafNode | SnapDirNode)
            and node.lookups == 0
            and not node.pinned
            and self._nodes.get(node.ino) is node
        ):
            self._drop(node)

    def _drop(self, node: Node) -> None:
        ino = node.ino
        del self._nodes[ino]
        if isinstance(node, SnapLeafNode):
            if self._collided.get(node.key) == ino:
                del self._collided[node.key]
            return
        parent = node.parent
        if parent is not None:
            children = getattr(parent, "children", None)
            if children is not None and children.get(node.name) is node:
                del children[node.name]
