"""A snapshot's user.cascowfs.* names show only what cascowfs recorded: a tree cannot forge them,
whether they are set inside a branch, in an imported tree, or carried by a `cp -a` export of a
snapshot imported again. Every name the code serves is attacked on the tree's root, a
subdirectory and a file, in-process and through the real mount, plus random names under the
namespace."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs import Client
from cascowfs.fuse.snapshot_view import TREE_XATTR, XATTR_PREFIX, root_xattrs
from cascowfs.model import SnapshotInfo
from cascowfs.names import MAX_LABELS
from conftest import hypothesis_settings
from fusehelpers import mounted, needs_fuse

FORGED = b"forged"


def _over_limit_labels() -> dict[str, str]:
    return {f"k{i}": "v" for i in range(MAX_LABELS + 1)}


def recorded_names() -> set[bytes]:
    """Every name cascowfs serves under user.cascowfs. on a snapshot, from the code itself."""
    full = SnapshotInfo("s", "0" * 64, "p", 1, 2, 3, {"reward": "1"})
    over = SnapshotInfo("s", "0" * 64, "p", 1, 2, 3, _over_limit_labels())
    return set(root_xattrs(full)) | set(root_xattrs(over)) | {TREE_XATTR}


def _reserved(xattrs) -> list[bytes]:
    return [key for key, _ in xattrs if key.startswith(XATTR_PREFIX)]


def _forge(paths: list[bytes], names: set[bytes]) -> None:
    for path in paths:
        for name in names:
            os.setxattr(path, name, FORGED)


def _forge_tree(root: Path, names: set[bytes]) -> None:
    """The names on the tree's root, a subdirectory and a file."""
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "file").write_text("x\n")
    os.setxattr(root / "sub" / "file", "user.own", b"kept")
    _forge([os.fsencode(root), os.fsencode(root / "sub"), os.fsencode(root / "sub" / "file")],
           names)


def _assert_stored_clean(sm, snap: str) -> None:
    stack = [(b"", sm.root_entry(snap))]
    while stack:
        rel, entry = stack.pop()
        assert not _reserved(entry.xattrs), (snap, rel, entry.xattrs)
        if entry.is_dir:
            stack += [(rel + b"/" + n, e) for n, e in sm.read_tree(entry.ref).items()]


# -- in-process: import and commit strip the namespace -----------------------------------------
def test_import_and_commit_strip_every_recorded_name(sm, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    _forge_tree(src, recorded_names())
    sm.import_tree(src, "base", {"real": "1"})
    _assert_stored_clean(sm, "base")
    assert dict(sm.read_tree(sm.read_tree(sm.root_entry("base").ref)[b"sub"].ref)[b"file"]
                .xattrs) == {b"user.own": b"kept"}
    branch = sm.create_branch("agent", "base")
    _forge_tree(branch.tree, recorded_names())
    (branch.tree / "sub" / "new").write_text("y\n")
    _forge([os.fsencode(branch.tree / "sub" / "new")], recorded_names())
    sm.commit("agent", "step", {"real": "2"})
    _assert_stored_clean(sm, "step")
    info = sm.snapshot("step")
    assert (info.parent, info.labels) == ("base", {"real": "2"})


# Names under the namespace that the code may add later, and odd ones: all must go.
RESERVED_SUFFIX = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
                          max_size=40)


def test_random_reserved_names_never_reach_a_snapshot(sm, tmp_path: Path):
    counter = iter(range(10**6))

    @hypothesis_settings(20)
    @given(st.sets(RESERVED_SUFFIX, min_size=1, max_size=5))
    def prop(suffixes):
        n = next(counter)
        names = {XATTR_PREFIX + s.encode() for s in suffixes}
        src = tmp_path / f"src{n}"
        src.mkdir()
        _forge_tree(src, names)
        sm.import_tree(src, f"imp{n}")
        _assert_stored_clean(sm, f"imp{n}")
        branch = sm.create_branch(f"b{n}", f"imp{n}")
        try:
            (branch.tree / "sub" / "file").write_text("changed\n")
            _forge_tree(branch.tree, names)
            sm.commit(f"b{n}", f"c{n}")
            _assert_stored_clean(sm, f"c{n}")
        finally:
            sm.discard(f"b{n}")

    prop()


# -- through the mount ------------------------------------------------------------------------
def _xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


def _assert_only_recorded(fs, client: Client, snap: str, parent: str | None,
                          labels: dict[str, str]) -> None:
    root = fs.mnt / "snapshots" / snap
    shown = {k: v for k, v in _xattrs(root).items() if k.startswith("user.cascowfs.")}
    assert FORGED not in shown.values(), shown
    info = client.snapshot(snap)
    assert (info.parent, info.labels, info.error) == (parent, labels, None)
    want = {k.decode(): v for k, v in root_xattrs(info).items()}
    assert shown == want
    for below in (root / "sub", root / "sub" / "file"):
        assert not [n for n in os.listxattr(below) if n.startswith("user.cascowfs.")]
        for name in recorded_names() - {TREE_XATTR}:
            with pytest.raises(OSError) as exc:
                os.getxattr(below, name)
            assert exc.value.errno == errno.ENODATA
    assert os.getxattr(root / "sub", TREE_XATTR) != FORGED


@needs_fuse
def test_snapshots_show_only_recorded_metadata_through_the_mount():
    with mounted() as fs, Client(fs.mnt) as client:
        names = recorded_names() | {n.encode() for n in os.listxattr(fs.mnt)}
        assert {b"user.cascowfs.pid", b"user.cascowfs.store"} <= names
        src = fs.base / "src"
        src.mkdir()
        _forge_tree(src, names)
        client.import_tree(src, "base", {"real": "1"})
        _assert_only_recorded(fs, client, "base", None, {"real": "1"})

        tree = client.branch("agent", "base")
        _forge_tree(tree, names)
        client.commit("agent", "step", {"real": "2"})
        _assert_only_recorded(fs, client, "step", "base", {"real": "2"})

        # an exported copy carries the served names; importing it takes none of them
        out = fs.base / "export"
        subprocess.run(["cp", "-a", str(fs.mnt / "snapshots" / "step"), str(out)], check=True)
        assert os.getxattr(out, "user.cascowfs.parent") == b"base"
        client.import_tree(out, "again")
        _assert_only_recorded(fs, client, "again", None, {})
