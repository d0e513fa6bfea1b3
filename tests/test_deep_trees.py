"""Trees deeper than Python's recursion limit (1,000 frames), which code in a branch can make
with a mkdir loop: every walk over a tree (the upper walk and ``finalize`` of a commit or a
status, ``canonicalize_links``, layer writing, diff, fsck's scan) goes from a stack, so such a
branch commits, and its snapshot branches, resets, diffs, merges and checks like any other."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from conftest import assert_fsck_clean, needs_overlay
from support.mounts import force_unmount_below
from cascowfs.client import _diff_dirs
from cascowfs.fsck import comparable
from cascowfs.layers import remove_within_filesystem
from cascowfs.model import Change, Entry
from cascowfs.scan import DirNode, ObjectSink, canonicalize_links, finalize, link_key
from cascowfs.state import StateManager
from cascowfs.trees import TreeStore
from cascowfs.tuning import Tuning

# Past the recursion limit, and below PATH_MAX (4,096 bytes) with one-byte names: "d/" a level.
DEPTH = 1_500
# In memory no path is made: far past the limit.
IN_MEMORY_DEPTH = 3_000
FILE_EVERY = 500  # a file "f" every this many levels


def _deep_chain(top: Path, depth: int) -> str:
    """``depth`` directories "d" one in the other under ``top``, made through descriptors, a
    file "f" every ``FILE_EVERY`` levels, a file "bottom" at the end, and "top-link" under
    ``top`` a hard link to it; the path of "bottom"."""
    root = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.dup(root)
    try:
        for level in range(depth):
            if level % FILE_EVERY == 0:
                _write_at(fd, "f", b"level %d" % level)
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        _write_at(fd, "bottom", b"at the bottom")
        os.link("bottom", "top-link", src_dir_fd=fd, dst_dir_fd=root)
    finally:
        os.close(fd)
        os.close(root)
    return "d/" * depth + "bottom"


def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _tree_view(top: Path) -> dict[str, tuple]:
    """path -> (kind and mode, size, bytes of a file) of everything below ``top`` on disk, and
    the hard-link groups; from a stack (the views of tests/support recurse)."""
    view: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    dirs = [(os.fspath(top), "")]
    while dirs:
        path, rel = dirs.pop()
        for name in os.listdir(path):
            cpath, crel = f"{path}/{name}", f"{rel}/{name}" if rel else name
            st = os.lstat(cpath)
            data = None
            if stat.S_ISREG(st.st_mode):
                data = Path(cpath).read_bytes()
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(crel)
            elif stat.S_ISDIR(st.st_mode):
                dirs.append((cpath, crel))
            view[crel] = (st.st_mode, st.st_size if data is not None else 0, data)
    view["links"] = tuple(sorted(tuple(sorted(g)) for g in inodes.values() if len(g) > 1))
    return view


def _snapshot_view(sm: StateManager, id: str) -> dict[str, tuple]:
    """``_tree_view`` of snapshot ``id``, read from the CAS."""
    view: dict[str, tuple] = {}
    groups: dict[bytes, list[str]] = {}
    for path, e in sm.trees.walk(sm.root_entry(id)):
        rel = path.decode()
        data = sm.read_file(e.ref, 0, e.size + 1) if e.is_file else None
        if e.link:
            groups.setdefault(e.link, []).append(rel)
        view[rel] = (e.mode, e.size if data is not None else 0, data)
    view["links"] = tuple(sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1))
    return view


def _write_deep(tree: Path, depth: int, data: bytes) -> None:
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        _write_at(fd, "bottom", data)
    finally:
        os.close(fd)


@needs_overlay
def test_a_branch_deeper_than_the_recursion_limit_commits_and_stays_usable(
    tmp_path: Path, track_store
) -> None:
    assert DEPTH > sys.getrecursionlimit()
    store = track_store(tmp_path / "store")
    sm = StateManager.open(store, tuning=Tuning(merge_fan_in=2))
    try:
        tree = sm.create_branch("b").tree
        bottom = _deep_chain(tree, DEPTH)
        made = _tree_view(tree)
        assert made["links"] == ((bottom, "top-link"),)
        status = sm.status("b")
        assert {c.kind for c in status} == {"A"} and len(status) == len(made) - 1

        sm.commit("b", "c1")
        sm.settle()  # its delta layer written
        assert _snapshot_view(sm, "c1") == made
        assert sm.status("b") == []

        other = sm.create_branch("b2", "c1").tree  # on the layer just written
        assert _tree_view(other) == made
        _write_deep(other, DEPTH, b"changed at the bottom")
        assert sm.status("b2") == [Change(bottom, "M"), Change("top-link", "M")]
        sm.commit("b2", "c2")
        sm.settle()  # its layer written, then merged with c1's (fan-in 2)
        assert sm.diff("c1", "c2") == [Change(bottom, "M"), Change("top-link", "M")]
        assert len(sm.diff(None, "c2")) == len(made) - 1
        assert len(sm.layer_chain("c2")) == 1  # the merged layer

        sm.reset("b", "c2")
        assert _tree_view(tree) == _tree_view(other) == _snapshot_view(sm, "c2")
        sm.flatten("c1")  # a full layer of the deep tree
        assert _tree_view(sm.create_branch("b3", "c1").tree) == made
        sm.close()
        assert_fsck_clean(store, deep=True)
    finally:
        sm.close()
        _remove_store(store)


def _remove_store(store: Path) -> None:
    """Unmount and delete a store: pytest deletes old temporary directories with
    ``shutil.rmtree``, which recurses (in Python 3.11), and the session's leak check walks
    them with ``os.walk``, which does too."""
    force_unmount_below(store)
    remove_within_filesystem(store)


def _deep_node(depth: int, link: bytes) -> DirNode:
    """A DirNode chain ``depth`` directories "d" deep: at its top a file "top-link" and at its
    bottom a file "bottom", hard links of one group (keyed ``link``)."""
    meta = Entry(b"", stat.S_IFDIR | 0o755, 0, 0, 1, 0, b"", 0, ())
    leaf = Entry(b"bottom", stat.S_IFREG | 0o644, 0, 0, 1, 0, b"", 0, (), link)
    node = DirNode(meta._replace(name=b"d"), {b"bottom": leaf})
    for _ in range(depth - 1):
        node = DirNode(meta._replace(name=b"d"), {b"d": node})
    return DirNode(meta, {b"d": node, b"top-link": leaf._replace(name=b"top-link")})


class _Listings(TreeStore):
    def __init__(self, listings: dict[bytes, dict[bytes, Entry]]) -> None:  # noqa: D107
        self.listings = listings

    def get(self, tree_id, txn=None, extra=None):
        return self.listings[tree_id]


def test_trees_far_deeper_than_the_recursion_limit_encode_walk_and_diff() -> None:
    """The in-memory walks at a depth no path on disk could have (PATH_MAX)."""
    listings: dict[bytes, dict[bytes, Entry]] = {}

    def remember(tree_id: bytes, entries: dict[bytes, Entry], _encoding) -> None:
        listings[tree_id] = entries

    trees = _Listings(listings)
    bottom = b"d/" * IN_MEMORY_DEPTH + b"bottom"
    node = _deep_node(IN_MEMORY_DEPTH, b"stale key")
    canonicalize_links(trees, node)  # the group keyed by its members' paths
    root = finalize(node, ObjectSink(), remember=remember)
    assert root.tree_links == 2
    walked = dict(trees.walk(root))
    assert len(walked) == IN_MEMORY_DEPTH + 2
    assert walked[bottom].link == walked[b"top-link"].link == link_key([bottom, b"top-link"])
    assert len(comparable(trees, root)) == IN_MEMORY_DEPTH + 3

    other = finalize(_deep_node(IN_MEMORY_DEPTH, b"other"), ObjectSink(), remember=remember)
    assert trees.diff(root, root) == []
    assert trees.diff(root, other) == [Change(bottom.decode(), "M"), Change("top-link", "M")]
    assert len(trees.diff(None, root)) == IN_MEMORY_DEPTH + 2


def test_the_client_diff_walks_trees_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    """``Client.diff``'s walk, on two plain directories: no daemon, so no tree ids to skip
    equal directories by, and files on one device are equal only as one inode (every file
    of two copies differs)."""
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        a.mkdir()
        b.mkdir()
        _deep_chain(a, DEPTH)
        _deep_chain(b, DEPTH)
        view = _tree_view(b)
        del view["links"]
        files = sorted(path for path, (mode, _, _) in view.items() if stat.S_ISREG(mode))
        assert len(files) == DEPTH // FILE_EVERY + 2
        changes: list[Change] = []
        _diff_dirs(a, b, "", changes)
        assert sorted(changes) == [Change(path, "M") for path in files]
        added: list[Change] = []
        _diff_dirs(None, b, "", added)
        assert sorted(added) == sorted(Change(path, "A") for path in view)
    finally:  # see _remove_store
        remove_within_filesystem(a)
        remove_within_filesystem(b)
