"""An import's image written straight from a settled source (``direct_image.py``): used when
root imports a tree nobody touched since before the import, and refused, the layer then
written from the CAS, whenever the tree changed meanwhile, holds what a snapshot leaves out,
or is not root's to read. Whichever way, a branch on the import shows exactly its snapshot."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import conftest
from conftest import (
    assert_fsck_clean,
    assert_same_view,
    check_live,
    dir_view,
    needs_overlay,
    run_child,
    snapshot_view,
)
from cascowfs import direct_image, images, overlay
from cascowfs.direct_image import DirectImage
from cascowfs.errors import BusyError, NotFoundError
from cascowfs.privacy import Caller
from cascowfs.tuning import Tuning

pytestmark = needs_overlay

FILE_BACKED_IMAGES = Tuning(layer_images=images.FILE_BACKED)


@pytest.fixture(autouse=True)
def _file_backed_images():
    if images.detect(images.AUTO, Path("/var/tmp")) != images.FILE_BACKED:
        pytest.skip("this machine mounts no file-backed EROFS image")


@pytest.fixture
def settled(monkeypatch):
    """Every entry made before the import counts as settled: no 2 s wait per test. Entries
    made before an import still have ctimes before it (the kernel's clock runs forward)."""
    monkeypatch.setattr(direct_image, "SETTLED_NS", 0)


@pytest.fixture
def builds(monkeypatch) -> list[Path]:
    """The trees mkfs.erofs is run on, in order."""
    trees: list[Path] = []
    build = images.build

    def spy(tree, image, **kw):
        trees.append(Path(tree))
        build(tree, image, **kw)

    monkeypatch.setattr(images, "build", spy)
    return trees


def _source(root: Path) -> Path:
    """Every kind of entry an import keeps, with attributes mkfs.erofs must carry over."""
    (root / "d" / "e").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "f").write_bytes(b"file\n")
    (root / "d" / "big").write_bytes(os.urandom(300_000))
    (root / "d" / "e" / "deep").write_bytes(b"deep")
    (root / "z-last").write_bytes(b"the walk meets it last")
    os.link(root / "f", root / "d" / "hard")
    os.link(root / "f", root.parent / f"{root.name}-outside")  # a link out of the tree
    os.symlink("../f", root / "d" / "link")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.setxattr(root / "f", b"user.note", b"x")
    os.setxattr(root / "d", b"user.dir", b"y" * 100)
    os.chmod(root / "d" / "e", 0o750)
    os.chmod(root / "f", 0o4755)
    os.chown(root / "d", 1234, 5678)
    os.utime(root / "d" / "e" / "deep", ns=(1, 123456789))
    return root


def _chain(sm, sid: str) -> list[str]:
    with sm.db.read() as txn:
        return sm.catalog.snapshot(txn, sid).layers


def _imported(sm, src: Path, builds: list[Path]) -> Path:
    """Import ``src`` as "base"; a branch on it, its view checked against the snapshot's and
    the source's; the tree of that branch."""
    sm.import_tree(src, "base")
    tree = sm.create_branch("b", "base").tree
    assert_same_view(dir_view(tree), snapshot_view(sm, "base"), "branch on the import")
    (lid,) = _chain(sm, "base")
    assert sm.layers.is_image(lid)
    return tree


def test_a_settled_tree_is_imaged_from_the_source_itself(tmp_path, settled, builds):
    src = _source(tmp_path / "src")
    with conftest.open_store(tmp_path / "store", tuning=FILE_BACKED_IMAGES) as sm:
        _imported(sm, src, builds)
        assert builds == [src], "mkfs.erofs read the source: no mirror written"
        assert_same_view(snapshot_view(sm, "base"), dir_view(src), "snapshot of the source")
        check_live(sm, deep=True)


def test_a_tree_changed_just_before_the_import_gets_a_mirror(tmp_path, builds):
    src = _source(tmp_path / "src")  # its root changed just now: SETTLED_NS is not over
    with conftest.open_store(tmp_path / "store", tuning=FILE_BACKED_IMAGES) as sm:
        _imported(sm, src, builds)
        assert len(builds) == 1 and builds[0] != src
        assert_same_view(snapshot_view(sm, "base"), dir_view(src), "snapshot of the source")


def test_an_entry_changed_before_the_walk_meets_it_refuses_the_image(
    tmp_path, monkeypatch, builds
):
    src = _source(tmp_path / "src")
    time.sleep(0.3)
    (src / "d" / "e" / "deep").write_bytes(b"changed after the rest settled")
    monkeypatch.setattr(direct_image, "SETTLED_NS", 150_000_000)  # the root: settled; deep: not
    with conftest.open_store(tmp_path / "store", tuning=FILE_BACKED_IMAGES) as sm:
        _imported(sm, src, builds)
        assert builds[0] == src and len(builds) == 2, "refused, then written from the store"
        assert_same_view(snapshot_view(sm, "base"), dir_view(src), "snapshot of the source")
        check_live(sm, deep=True)


def test_an_entry_changed_during_the_import_refuses_the_image(
    tmp_path, settled, monkeypatch, builds
):
    """A writer changes a file the walk met long before it meets the last entry (so what
    the walk read may differ from what mkfs.erofs read): the image is refused, and the
    branch shows what the snapshot holds."""
    src = _source(tmp_path / "src")
    observe = DirectImage.observe

    def meanwhile(self, path, st):
        if path.endswith(b"/d/e/deep"):  # the walk lists a directory before its subdirectories
            (src / "z-last").write_bytes(b"written while the import ran")
        observe(self, path, st)

    monkeypatch.setattr(DirectImage, "observe", meanwhile)
    with conftest.open_store(tmp_path / "store", tuning=FILE_BACKED_IMAGES) as sm:
        _imported(sm, src, builds)
        assert builds[0] == src and len(builds) == 2
        check_live(sm, deep=True)


def test_a_directory_swapped_for_a_symlink_while_mkfs_reads_is_caught(
    tmp_path, settled, monkeypatch, builds
):
    """An adversary who can write the tree swaps a directory for a symlink to one the image
    must not hold, for exactly as long as mkfs.erofs reads, and swaps it back: the renames
    changed the parent's ctime, so the image is refused and goes unmounted. (The walk, beside
    mkfs.erofs, may have met the symlink: the snapshot then holds a symlink. Or the walk or
    a read after it found the tree changed under it: the import fails, EBUSY or ENOENT, with
    nothing kept, and is tried again.)"""
    src = _source(tmp_path / "src")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"never in a branch")
    build = images.build

    def swapping(tree, image, **kw):
        if Path(tree) == src:
            os.rename(src / "d", tmp_path / "d-aside")
            os.symlink(secret, src / "d")
            try:
                return build(tree, image, **kw)
            finally:
                os.unlink(src / "d")
                os.rename(tmp_path / "d-aside", src / "d")
        return build(tree, image, **kw)

    monkeypatch.setattr(images, "build", swapping)
    with conftest.open_store(tmp_path / "store", tuning=FILE_BACKED_IMAGES) as sm:
        for _attempt in range(20):
            builds.clear()
            try:
                tree = _imported(sm, src, builds)
                break
            except (BusyError, NotFoundError):
                assert sm.snapshots() == [] and builds[0] == src
        else:
            raise AssertionError("20 imports in a row found the tree changed under them")
        assert builds[0] == src and len(builds) == 2
        assert all(node.data != b"never in a branch" for node in dir_view(tree).values())
        check_live(sm, deep=True)


@pytest.mark.parametrize(
    "key", [b"user.cascowfs.tree", b"trusted.overlay.opaque"], ids=["reserved", "overlay"]
)
def test_an_xattr_a_snapshot_leaves_out_refuses_the_image(tmp_path, settled, builds, key):
    src = _source(tmp_path / "src")
    os.setxattr(src / "d", key, b"y")
    with conftest.open_store(tmp_path / "store", tuning=FILE_BACKED_IMAGES) as sm:
        tree = _imported(sm, src, builds)
        assert builds[0] == src and len(builds) == 2
        (lid,) = _chain(sm, "base")
        with sm.layers.mounted([lid]) as (lower,):
            assert os.fsdecode(key) not in os.listxattr(lower / "d")
        assert os.fsdecode(key) not in os.listxattr(tree / "d")


def test_another_filesystem_inside_the_tree_refuses_the_image(tmp_path, settled, builds):
    src = _source(tmp_path / "src")
    inner = src / "d" / "mnt"
    inner.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "inner", inner], check=True)
    try:
        (inner / "on-tmpfs").write_bytes(b"another filesystem")
        with conftest.open_store(tmp_path / "store", tuning=FILE_BACKED_IMAGES) as sm:
            _imported(sm, src, builds)
            assert builds[0] == src and len(builds) == 2
    finally:
        subprocess.run(["umount", inner], check=True)


def test_a_name_no_image_may_hold_keeps_the_layer_a_directory(tmp_path, settled, builds):
    src = _source(tmp_path / "src")
    (src / "d" / ("n" * 255)).write_bytes(b"a name of 255 bytes")
    with conftest.open_store(tmp_path / "store", tuning=FILE_BACKED_IMAGES) as sm:
        sm.import_tree(src, "base")
        (lid,) = _chain(sm, "base")
        assert not sm.layers.is_image(lid)
        assert builds == [src], "the walk found it; the layer written from the store stays a dir"
        tree = sm.create_branch("b", "base").tree
        assert_same_view(dir_view(tree), snapshot_view(sm, "base"), "branch on the import")


def test_who_gets_a_direct_image(tmp_path, settled, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    image = tmp_path / "image"
    plan = DirectImage.plan
    assert plan(src, image, reader=None, image_mode=images.FILE_BACKED) is not None
    assert plan(src, image, reader=Caller(0, 0), image_mode=images.LOOP) is not None
    assert plan(src, image, reader=Caller(1000, 1000), image_mode=images.FILE_BACKED) is None
    assert plan(src, image, reader=None, image_mode=images.DIRECTORIES) is None
    assert overlay.mount_holding(Path("/proc/sys")).fstype == "proc"
    assert overlay.mount_holding(Path("/")).target == "/"
    monkeypatch.setattr(direct_image, "TRUSTED_FILESYSTEMS", frozenset({"xfs"}))
    assert plan(src, image, reader=None, image_mode=images.FILE_BACKED) is None


def test_a_source_another_user_may_move_gets_a_mirror(tmp_path, settled):
    """mkfs.erofs reads the source by path: a user who may rename a directory on the way could
    swap the source for a link to root's files while it reads, and back, which no ctime of
    the tree shows. Only a path no one but root may change gets a direct image."""
    image = tmp_path / "image"
    cases = {  # the directory above the source: (owner, mode), and the source's owner
        "root's": ((0, 0o755), 0, True),
        "group-writable": ((0, 0o775), 0, False),
        "a user's": ((65534, 0o755), 0, False),
        "sticky, root's source": ((0, 0o1777), 0, True),
        "sticky, a user's source": ((0, 0o1777), 65534, False),
    }
    for case, ((owner, mode), src_owner, direct) in cases.items():
        above = tmp_path / case
        src = above / "src"
        src.mkdir(parents=True)
        os.chown(src, src_owner, src_owner)
        os.chown(above, owner, owner)
        os.chmod(above, mode)
        planned = DirectImage.plan(src, image, reader=None, image_mode=images.FILE_BACKED)
        assert (planned is not None) == direct, case
        assert direct_image.only_root_moves(src) == direct, case


CHILD = """
import sys
from cascowfs.state import StateManager
sm = StateManager.open(sys.argv[1])
sm.import_tree(sys.argv[2], "imp")
"""


def test_a_kill_during_a_direct_import_leaves_nothing(tmp_path):
    """kill -9 while the import's mkfs.erofs writes from the source: no mkfs.erofs left
    running, no staging, no snapshot; the import then runs again."""
    src = _source(tmp_path / "src")
    store = conftest.register_store(tmp_path / "store")
    with conftest.open_store(store):
        pass
    time.sleep(direct_image.SETTLED_NS / 1e9 + 0.1)
    proc = run_child(CHILD, str(store), str(src), crash_at="import.sealing")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = subprocess.run(["pgrep", "-f", f"mkfs.erofs .*{store}"], capture_output=True)
    assert left.returncode == 1, f"mkfs.erofs outlived its daemon: {left.stdout!r}"
    with conftest.open_store(store) as sm:  # recovery
        assert [s.id for s in sm.snapshots()] == []
        assert not any((store / "staging").iterdir())
    assert_fsck_clean(store, deep=True)
    with conftest.open_store(store) as sm:
        sm.import_tree(src, "imp")
        assert_same_view(snapshot_view(sm, "imp"), dir_view(src), "import after the kill")
