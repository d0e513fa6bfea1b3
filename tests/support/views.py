"""Comparable views of trees: ``{relative path (bytes, b"" = root): Node}``.

``dir_view(path)``          what a reader of a real directory (a branch, a source tree) sees
``snapshot_view(sm, id)``   the same, walked from the CAS via root_entry/read_tree/read_file
``assert_same_view(got, want, what)``  equality with a readable list of differing paths
``expected_status(before, after)``     the A/M/D lines a status/diff must contain
``assert_status(changes, before, after, what)``  status/diff checked against that oracle
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple

from cascowfs.fsmeta import RESERVED_XATTR_PREFIX

OVERLAY_PREFIX = b"trusted.overlay."


class Node(NamedTuple):
    """Everything a reader sees of one path (docs/interface.md, Snapshots)."""

    kind: str  # f d l c b p s
    mode: int  # full st_mode
    uid: int
    gid: int
    mtime_ns: int
    data: bytes | None  # file content / symlink target / None
    rdev: int  # device nodes only, else 0
    xattrs: tuple[tuple[bytes, bytes], ...]  # sorted; trusted.overlay.* never included
    links: tuple[bytes, ...] | None  # every path of this inode inside the tree (if > 1)


_KIND = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
         stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def _xattrs_of(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in names:
        key = os.fsencode(name)
        if key.startswith(OVERLAY_PREFIX) or key.startswith(RESERVED_XATTR_PREFIX):
            continue  # overlayfs's own; cascowfs's own, which commit and import strip
        out.append((key, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(sorted(out))


def _read_all(path: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        parts = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(parts)
            parts.append(b)
    finally:
        os.close(fd)


def dir_view(root: Path | str | bytes) -> dict[bytes, Node]:
    """The view of a real directory tree (lstat, readlink, listxattr, hard links by inode)."""
    base = os.fsencode(root)
    view: dict[bytes, Node] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}

    def node(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        kind = _KIND[stat.S_IFMT(st.st_mode)]
        data = None
        if kind == "f":
            data = _read_all(path)
        elif kind == "l":
            data = os.readlink(path)
        rdev = st.st_rdev if kind in "cb" else 0
        view[rel] = Node(kind, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, data, rdev,
                         _xattrs_of(path), None)
        if kind != "d":
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        else:
            for name in sorted(os.listdir(path)):
                node(path + b"/" + name, rel + b"/" + name if rel else name)

    node(base, b"")
    for members in inodes.values():
        if len(members) > 1:
            group = tuple(sorted(members))
            for p in members:
                view[p] = view[p]._replace(links=group)
    return view


def snapshot_view(sm, snapshot_id: str) -> dict[bytes, Node]:
    """The view of a snapshot, read from the CAS through the public read path. Also checks
    that sizes and the per-directory file/byte totals agree with what is stored."""
    root = sm.root_entry(snapshot_id)
    view: dict[bytes, Node] = {}
    groups: dict[bytes, list[bytes]] = {}

    def entry_node(e, rel: bytes) -> Node:
        kind = _KIND[stat.S_IFMT(e.mode)]
        data = None
        if kind == "f":
            data = sm.read_file(e.ref, 0, e.size + 1)
            assert len(data) == e.size, f"{rel!r}: entry size {e.size}, content {len(data)} bytes"
        elif kind == "l":
            data = e.ref
        if e.link and kind != "d":
            groups.setdefault(e.link, []).append(rel)
        return Node(kind, e.mode, e.uid, e.gid, e.mtime_ns, data, e.rdev if kind in "cb" else 0,
                    tuple(e.xattrs), None)

    def walk(e, rel: bytes) -> tuple[int, int]:
        files = total = 0
        for name, child in sorted(sm.read_tree(e.ref).items()):
            assert name == child.name and name and b"/" not in name, f"bad name {name!r} in {rel!r}"
            crel = rel + b"/" + name if rel else name
            view[crel] = entry_node(child, crel)
            if child.is_dir:
                f, t = walk(child, crel)
                assert (child.tree_files, child.tree_bytes) == (f, t), \
                    f"{crel!r}: stored totals {(child.tree_files, child.tree_bytes)}, counted {(f, t)}"
                files, total = files + f, total + t
            elif child.is_file:
                files, total = files + 1, total + child.size
        return files, total

    view[b""] = entry_node(root, b"")
    files, total = walk(root, b"")
    info = sm.snapshot(snapshot_id)
    assert (info.files, info.size) == (files, total) == (root.tree_files, root.tree_bytes), \
        f"snapshot {snapshot_id}: info {(info.files, info.size)}, root " \
        f"{(root.tree_files, root.tree_bytes)}, counted {(files, total)}"
    for members in groups.values():
        if len(members) > 1:  # a group of one (a member left alone by a copy-up) is no group
            group = tuple(sorted(members))
            for p in members:
                view[p] = view[p]._replace(links=group)
    return view


def _short(node: Node | None) -> str:
    if node is None:
        return "(absent)"
    data = node.data
    if data is not None and len(data) > 40:
        data = data[:40] + b"...(%d bytes)" % len(node.data)
    return repr(node._replace(data=data))


def describe_view_diff(got: dict[bytes, Node], want: dict[bytes, Node], limit: int = 12) -> str:
    paths = sorted(p for p in got.keys() | want.keys() if got.get(p) != want.get(p))
    lines = []
    for p in paths[:limit]:
        g, w = got.get(p), want.get(p)
        if g is not None and w is not None:
            fields = [f for f in Node._fields if getattr(g, f) != getattr(w, f)]
            lines.append(f"  {p!r}: differs in {fields}\n      got  {_short(g)}\n      want {_short(w)}")
        else:
            lines.append(f"  {p!r}:\n      got  {_short(g)}\n      want {_short(w)}")
    if len(paths) > limit:
        lines.append(f"  ... and {len(paths) - limit} more paths")
    return "\n".join(lines)


def assert_same_view(got: dict[bytes, Node], want: dict[bytes, Node], what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: views differ at {sum(1 for p in got.keys() | want.keys() if got.get(p) != want.get(p))} "
                             f"path(s):\n{describe_view_diff(got, want)}")


# -- status / diff oracle -----------------------------------------------------------------
def _text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def expected_status(before: dict[bytes, Node] | None, after: dict[bytes, Node]
                    ) -> tuple[set[str], set[str]]:
    """(lines that must appear, lines that may appear) for the change ``before`` -> ``after``.

    Rules (docs/interface.md gives only the A|M|D line format; the engine documents the rest in
    trees.py, and these rules are what a reader can check independently):
    * a path only in ``after`` is ``A``, only in ``before`` is ``D``; a path that is a directory
      on one side and not on the other is ``D`` and ``A``;
    * a non-directory whose type, mode, owner, mtime, content/target, rdev or xattrs changed is
      ``M``; one whose only change is its hard-link grouping (another name was linked to it or
      unlinked from it) *may* be ``M``: its bytes and attributes are unchanged;
    * a directory whose mode, owner or xattrs changed is ``M``; one whose only change is its
      mtime *may* be ``M`` (every create/delete inside a directory moves its mtime, and the
      engine, like git, reports the children instead);
    * the root itself has no line (it has no path to print).
    """
    before = before or {}
    must: set[str] = set()
    may: set[str] = set()
    for p in (before.keys() | after.keys()) - {b""}:
        a, b = before.get(p), after.get(p)
        t = _text(p)
        if a is None:
            must.add(f"A {t}")
        elif b is None:
            must.add(f"D {t}")
        elif (a.kind == "d") != (b.kind == "d"):
            must.update({f"D {t}", f"A {t}"})
        elif a.kind == "d":
            if (a.mode, a.uid, a.gid, a.xattrs) != (b.mode, b.uid, b.gid, b.xattrs):
                must.add(f"M {t}")
            elif a.mtime_ns != b.mtime_ns:
                may.add(f"M {t}")
        elif a._replace(links=None) != b._replace(links=None):
            must.add(f"M {t}")
        elif a.links != b.links:
            may.add(f"M {t}")
    return must, may


def assert_status(changes, before: dict[bytes, Node] | None, after: dict[bytes, Node],
                  what: str) -> None:
    # the exact names, unquoted: quoting has its own tests (test_pathquote.py)
    lines = [f"{c.kind} {c.path}" for c in changes]
    assert len(lines) == len(set(lines)), f"{what}: duplicate lines {sorted(lines)}"
    assert changes == sorted(changes), f"{what}: not sorted: {lines}"
    must, may = expected_status(before, after)
    got = set(lines)
    missing, extra = must - got, got - must - may
    assert not missing and not extra, (f"{what}: status/diff lines wrong\n  missing: {sorted(missing)}"
                                       f"\n  unexpected: {sorted(extra)}")
