"""Only `cascowfs init` and `mount` create a store; every other verb refuses a path that is not
one and creates nothing.

A store is recognised by its metadata database (``STORE/meta/data.mdb``). The paths that are
not stores, each tried with every verb that opens a store: a missing path, an empty directory,
a source tree, a regular file, a symlink to a source tree, and a directory holding only some of
a store's own entry names but no database. For each, the exit status is 1, the errno is ENOENT
(missing) or EINVAL (anything else), the message says to run `cascowfs init`, and a listing of
the whole scratch directory is identical before and after.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cascowfs.cli import exit_status
from cascowfs.errors import CascowfsError, InvalidArgumentError, NotFoundError
from cascowfs.state import StateManager, is_store
from conftest import needs_overlay
from fusehelpers import (Cascow, cascow_base, make_source_tree, mounts_under, needs_fuse, run_cli,
                         tree_listing)

NOT_A_STORE = "not a cascowfs store; run cascowfs init"


def _not_a_store(kind: str, base: Path) -> tuple[Path, str]:
    """A path of ``kind`` under ``base`` that is not a store, and the errno name a verb that
    needs a store gives for it."""
    path = base / f"not-a-store-{kind}"
    if kind == "missing":
        return path, "ENOENT"
    if kind == "empty":
        path.mkdir()
    elif kind == "source-tree":
        make_source_tree(path, stdlib_slice=20)
    elif kind == "file":
        path.write_text("not a store\n")
    elif kind == "symlink-to-tree":
        make_source_tree(base / "linked-tree", stdlib_slice=20)
        path.symlink_to(base / "linked-tree")
    elif kind == "store-names-only":
        (path / "layers").mkdir(parents=True)
        (path / "meta").mkdir()
        (path / "lock").write_text("")
    return path, "EINVAL"


KINDS = ["missing", "empty", "source-tree", "file", "symlink-to-tree", "store-names-only"]


def _verbs(target: Path, src: Path) -> list[list[str]]:
    """Every verb that opens a store at rest, aimed at ``target``."""
    return [["fsck", str(target)], ["fsck", "--deep", str(target)], ["gc", str(target)],
            ["import", str(target), str(src), "snap"], ["diff", str(target), "-", "-"]]


@pytest.mark.parametrize("kind", KINDS)
def test_verbs_refuse_what_is_not_a_store_and_create_nothing(tmp_path, kind):
    src = make_source_tree(tmp_path / "src", stdlib_slice=20)
    target, want = _not_a_store(kind, tmp_path)
    before = tree_listing(tmp_path)
    for argv in _verbs(target, src):
        proc = run_cli(*argv, check=False)
        assert proc.returncode == exit_status(getattr(errno, want)), (argv, proc.stderr)
        assert f"{want}: " in proc.stderr and NOT_A_STORE in proc.stderr, (argv, proc.stderr)
        assert tree_listing(tmp_path) == before, argv


def test_import_with_swapped_arguments_leaves_the_source_tree_alone(tmp_path):
    """`cascowfs import SRC STORE ID`: the source tree is not a store, and is not made one."""
    src = make_source_tree(tmp_path / "src", stdlib_slice=20)
    StateManager.open(tmp_path / "store").close()
    before = tree_listing(tmp_path)
    proc = run_cli("import", str(src), str(tmp_path / "store"), "snap", check=False)
    assert proc.returncode == exit_status(errno.EINVAL)
    assert "EINVAL" in proc.stderr and NOT_A_STORE in proc.stderr
    assert tree_listing(tmp_path) == before


@pytest.mark.parametrize("kind", KINDS)
def test_open_without_create_refuses_what_is_not_a_store(tmp_path, kind):
    target, want = _not_a_store(kind, tmp_path)
    before = tree_listing(tmp_path)
    with pytest.raises(CascowfsError) as caught:
        StateManager.open(target, create=False)
    assert caught.value.errno_name == want and NOT_A_STORE in caught.value.message
    assert isinstance(caught.value, NotFoundError if want == "ENOENT" else InvalidArgumentError)
    assert tree_listing(tmp_path) == before


@pytest.mark.parametrize("kind,want", [("source-tree", errno.ENOTEMPTY),
                                       ("symlink-to-tree", errno.ENOTEMPTY),
                                       ("file", errno.ENOTDIR)])
def test_creating_open_refuses_a_non_empty_directory_or_a_file(tmp_path, kind, want):
    target, _ = _not_a_store(kind, tmp_path)
    before = tree_listing(tmp_path)
    with pytest.raises(CascowfsError) as caught:
        StateManager.open(target)
    assert caught.value.errno == want and str(target) in caught.value.message
    assert tree_listing(tmp_path) == before


@needs_overlay
@pytest.mark.parametrize("kind", ["missing", "empty", "store-names-only"])
def test_init_makes_a_store_that_every_verb_accepts(tmp_path, kind):
    src = make_source_tree(tmp_path / "src", stdlib_slice=20)
    target, _ = _not_a_store(kind, tmp_path)
    assert run_cli("init", str(target)).stdout.strip() == str(target)
    assert is_store(target)
    assert "snap" == run_cli("import", str(target), str(src), "snap").stdout.strip()
    for argv in _verbs(target, src):
        if argv[0] == "import":
            argv[-1] = "snap2"
        run_cli(*argv)
    assert run_cli("diff", str(target), "snap", "snap2").stdout == ""


@pytest.mark.parametrize("kind,want", [("source-tree", "ENOTEMPTY"),
                                       ("symlink-to-tree", "ENOTEMPTY"),
                                       ("file", "ENOTDIR")])
def test_init_refuses_what_it_would_spoil(tmp_path, kind, want):
    target, _ = _not_a_store(kind, tmp_path)
    before = tree_listing(tmp_path)
    proc = run_cli("init", str(target), check=False)
    assert proc.returncode == exit_status(getattr(errno, want))
    assert f"{want}: " in proc.stderr and str(target) in proc.stderr
    assert tree_listing(tmp_path) == before


@needs_overlay
def test_init_refuses_an_existing_store(tmp_path):
    store = tmp_path / "store"
    run_cli("init", str(store))
    before = tree_listing(tmp_path)
    proc = run_cli("init", str(store), check=False)
    assert proc.returncode == exit_status(errno.EEXIST)
    assert "EEXIST: " in proc.stderr and "already" in proc.stderr
    assert tree_listing(tmp_path) == before


@needs_fuse
@pytest.mark.parametrize("kind", ["source-tree", "file"])
def test_mount_refuses_a_directory_that_is_neither_empty_nor_a_store(kind):
    with cascow_base() as base:
        fs = Cascow(base)
        fs.store, _ = _not_a_store(kind, base)
        before = tree_listing(base)
        proc = run_cli("mount", "--background", str(fs.store), str(fs.mnt), check=False)
        try:
            refusal = {"source-tree": "ENOTEMPTY", "file": "ENOTDIR"}[kind]  # as interface.md
            assert proc.returncode == exit_status(getattr(errno, refusal)), proc.stderr
            assert f"{refusal}: " in proc.stderr and str(fs.store) in proc.stderr
            assert mounts_under(base) == []
            assert tree_listing(base) == before
        finally:
            fs.teardown()


@needs_fuse
def test_mount_makes_a_store_of_an_empty_directory():
    with cascow_base() as base:
        fs = Cascow(base)
        fs.store.mkdir()
        try:
            fs.start()
            assert is_store(fs.store)
            assert sorted(os.listdir(fs.mnt)) == ["branches", "ctl", "episodes", "events", "metrics", "observations", "snapshots"]
        finally:
            fs.teardown()


@needs_overlay
def test_a_store_on_a_volume_of_its_own_keeps_its_volume(tmp_path):
    """A store on its own xfs or tmpfs is mounted at the store's path: opening the store
    (which unmounts what its branches no longer need) took that mount down with them."""
    import subprocess

    from cascowfs import overlay

    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "cascowfs-test", str(store)],
                   check=True)
    try:
        src = make_source_tree(tmp_path / "src")
        with StateManager.open(store, create=True) as sm:
            sm.import_tree(src, "base")
            sm.create_branch("b", "base")
        with StateManager.open(store, create=False) as sm:  # recovery reconciles the mounts
            assert (sm.tree_path("b") / "json").is_dir()
            assert any(m.target == str(store) for m in overlay.all_mounts())
            sm.discard("b")
    finally:
        overlay.unmount_under(store)
        subprocess.run(["umount", str(store)], check=False)
    assert not any(m.target.startswith(str(store)) for m in overlay.all_mounts())
