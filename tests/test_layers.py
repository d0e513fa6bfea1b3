"""cascowfs/layers.py: layer directories written from the CAS (full trees, and deltas in
overlayfs's upper format that read back right when mounted over their base), and trees
deleted without ever following a link or entering a mount."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import assert_same_view, dir_view, needs_overlay, snapshot_view
from cascowfs import layers, overlay


def _source(root: Path) -> Path:
    """Every kind of entry a snapshot holds: files, an empty file, a symlink, hard links, a
    fifo, nested and empty directories, user xattrs, odd modes and times."""
    (root / "d" / "e").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "f").write_bytes(b"file\n")
    (root / "empty").write_bytes(b"")
    (root / "d" / "big").write_bytes(os.urandom(300_000))
    (root / "d" / "e" / "deep").write_bytes(b"deep")
    os.link(root / "f", root / "d" / "hard")
    os.symlink("../f", root / "d" / "link")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "f", b"user.note", b"x")
    os.chmod(root / "d" / "e" / "deep", 0o4711)
    os.chmod(root / "empty-dir", 0o700)
    os.utime(root / "d" / "e" / "deep", ns=(1, 123456789))
    os.utime(root / "d", ns=(1, 987654321))
    return root


def test_a_materialized_layer_reads_back_as_the_snapshot(sm, tmp_path):
    sm.import_tree(_source(tmp_path / "src"), "s")
    ticks: list[int] = []
    dst = tmp_path / "layer"
    layers.materialize(sm.trees, sm.content, sm.root_entry("s"), dst, ticks.append)
    assert_same_view(dir_view(dst), snapshot_view(sm, "s"), "materialized layer")
    assert sum(ticks) == sm.snapshot("s").size - len(b"file\n"), "a hard link counted twice"


def test_materializing_over_an_existing_directory_is_refused(sm, tmp_path):
    sm.import_tree(_source(tmp_path / "src"), "s")
    (tmp_path / "layer").mkdir()
    with pytest.raises(FileExistsError):
        layers.materialize(sm.trees, sm.content, sm.root_entry("s"), tmp_path / "layer")


def _edit(tree: Path) -> None:
    """Each kind of change a delta must express."""
    (tree / "f").write_bytes(b"changed")                # a modified file (and its hard link)
    os.unlink(tree / "empty")                           # a deleted file: a whiteout
    (tree / "d" / "e" / "deep").unlink()
    os.rmdir(tree / "d" / "e")                          # a deleted directory
    os.unlink(tree / "fifo")
    (tree / "fifo").mkdir()                             # a file replaced by a directory: opaque
    (tree / "fifo" / "inside").write_bytes(b"new")
    (tree / "new-dir" / "sub").mkdir(parents=True)      # a new subtree
    os.chmod(tree / "empty-dir", 0o755)                 # a directory's own attributes
    os.setxattr(tree / "d" / "big", b"user.tag", b"t")  # attributes only


@pytest.mark.parametrize("base_is_empty", [False, True])
def test_a_delta_over_its_base_reads_back_as_the_target(sm, tmp_path, base_is_empty):
    if base_is_empty:
        base_id, base_root = None, None
        sm.import_tree(_source(tmp_path / "src"), "target")
    else:
        sm.import_tree(_source(tmp_path / "src"), "base")
        tree = sm.create_branch("b", "base").tree
        _edit(tree)
        sm.commit("b", "target")
        base_id, base_root = "base", sm.root_entry("base")
    delta = tmp_path / "delta"
    layers.materialize_delta(sm.trees, sm.content, base_root, sm.root_entry("target"), delta)
    lowers = [delta]
    if base_id is not None:
        layers.materialize(sm.trees, sm.content, base_root, tmp_path / "base-layer")
        lowers.append(tmp_path / "base-layer")
    else:
        (tmp_path / "nothing").mkdir()  # a read-only overlay needs two lower layers
        lowers.append(tmp_path / "nothing")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    overlay.mount_overlay(mnt, lowers, readonly=True)
    try:
        assert_same_view(dir_view(mnt), snapshot_view(sm, "target"), "delta over its base")
    finally:
        overlay.unmount(mnt, lazy=False)
    if base_id is not None:
        assert not (delta / "d" / "e" / "deep").exists(), "a delta holds unchanged entries"
        assert stat.S_ISCHR(os.lstat(delta / "empty").st_mode), "no whiteout for a deletion"


def test_root_metadata_is_the_snapshot_roots(sm, tmp_path):
    src = _source(tmp_path / "src")
    os.chmod(src, 0o751)
    os.utime(src, ns=(5, 555))
    sm.import_tree(src, "s")
    root = sm.root_entry("s")
    upper = tmp_path / "upper"
    upper.mkdir(0o700)
    layers.set_root_metadata(upper, None)  # no snapshot under the branch: left alone
    assert stat.S_IMODE(os.lstat(upper).st_mode) == 0o700
    layers.set_root_metadata(upper, root)
    st = os.lstat(upper)
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == \
        (root.mode, root.uid, root.gid, root.mtime_ns) == (stat.S_IFDIR | 0o751, src.stat().st_uid,
                                                           src.stat().st_gid, 555)


def test_removing_within_a_filesystem_takes_files_missing_paths_and_locked_dirs(tmp_path):
    (tmp_path / "lone").write_bytes(b"x")
    layers.remove_within_filesystem(tmp_path / "lone")
    layers.remove_within_filesystem(tmp_path / "missing")
    tree = tmp_path / "tree"
    (tree / "locked" / "inner").mkdir(parents=True)
    (tree / "locked" / "inner" / "f").write_bytes(b"x")
    os.symlink(tmp_path, tree / "up")
    os.chmod(tree / "locked" / "inner", 0o500)  # read-only: made writable to empty it
    os.chmod(tree / "locked", 0o500)
    layers.remove_within_filesystem(tree)
    assert os.listdir(tmp_path) == []


def _odd_tree(root, outside):
    """Every kind of entry a layer or an upper holds, links pointing out of the tree."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x")
    (root / "locked").mkdir()
    (root / "locked" / "g").write_bytes(b"y")
    os.chmod(root / "locked", 0)  # overlayfs leaves work/work like this
    os.mknod(root / "whiteout", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mkfifo(root / "fifo")
    os.symlink(outside / "file", root / "link")
    os.symlink(outside, root / "dirlink")


@needs_overlay  # root: the tree holds a directory nobody may read
@pytest.mark.parametrize("rm", ["rm", "no rm"])
def test_deleting_trees_does_not_follow_links(tmp_path, monkeypatch, rm):
    """Every kind of entry goes (read-only directories, whiteouts, fifos); links pointing out
    of the tree are removed, not followed; with rm or, where it is missing, without."""
    if rm == "no rm":
        monkeypatch.setattr(layers, "_RM", None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"keep")
    trees = [tmp_path / "t1", tmp_path / "t2"]
    for t in trees:
        t.mkdir()
        _odd_tree(t, outside)
    (tmp_path / "lone").write_bytes(b"x")
    layers.remove_trees(trees + [tmp_path / "lone", tmp_path / "missing"])
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert (outside / "file").read_bytes() == b"keep"


@needs_overlay  # root, to mount
@pytest.mark.parametrize("rm", ["rm", "no rm"])
def test_deleting_a_tree_never_goes_through_a_mount(tmp_path, monkeypatch, rm):
    """A tree that holds a mount point loses everything else; the mounted files stay. (The
    check is by device, as ``rm --one-file-system`` does it: the trash's own mounts are
    overlays, each a device of its own, and are detached before anything is deleted.)"""
    if rm == "no rm":
        monkeypatch.setattr(layers, "_RM", None)
    tree = tmp_path / "tree"
    mnt = tree / "sub" / "mnt"
    mnt.mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"x")
    (tree / "other").mkdir()
    (tree / "other" / "g").write_bytes(b"y")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cascowfs-test", str(mnt)], check=True)
    try:
        (mnt / "precious").write_bytes(b"keep")
        layers.remove_trees([tree])
        assert (mnt / "precious").read_bytes() == b"keep"
        assert sorted(os.listdir(tree)) == ["sub"] and os.listdir(tree / "sub") == ["mnt"]
    finally:
        overlay.unmount(mnt, lazy=True)
    layers.remove_trees([tree])  # the mount gone, the rest goes too
    assert not tree.exists()


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def test_deleting_a_tree_never_follows_a_directory_swapped_for_a_link(tmp_path):
    """A process still writing into a discarded branch's upper swaps a directory of it for a
    symbolic link to a directory outside, atomically and again and again, while the tree is
    deleted: the files the link reaches, named as the tree's own are, all stay. (A deletion
    may fail as the tree changes under it; the next round deletes the rest.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    names = [f"f{i}" for i in range(8)]
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in names:
        (victim / name).write_bytes(b"keep")
    swapping: list[tuple[bytes, bytes]] = []  # the directory and the link of this round
    swaps = 0
    stop = threading.Event()

    def flip() -> None:
        nonlocal swaps
        while not stop.is_set():
            for a, b in swapping[-1:]:  # fails once the remover took either: no matter
                swaps += libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) == 0

    flipper = threading.Thread(target=flip)
    flipper.start()
    removed = 0
    try:
        for i in range(ROUNDS := 300):
            tree, link = tmp_path / f"tree{i}", tmp_path / f"link{i}"
            (tree / "a" / "d").mkdir(parents=True)
            for name in names:
                (tree / "a" / "d" / name).write_bytes(b"own")
                (tree / "a" / name).write_bytes(b"own")
            os.symlink(victim, link)
            swapping.append((os.fsencode(tree / "a" / "d"), os.fsencode(link)))
            try:
                layers.remove_within_filesystem(tree)
                removed += 1
            except OSError:
                pass  # the tree changed as it was deleted
            assert sorted(os.listdir(victim)) == names, f"round {i}"
    finally:
        stop.set()
        flipper.join()
    assert all((victim / name).read_bytes() == b"keep" for name in names)
    assert swaps > ROUNDS and removed > 0, (swaps, removed)
