"""A full store disk (docs/architecture.md, Guarantees): ENOSPC, nothing lost or half-done.

The store lives on a small, freshly made ext4 on a loop device. The disk is filled with a
ballast file to one of three levels before the operation, so that space runs out at different
steps of it: no space at all (the very first write: the WAL record), about half of what the
operation writes (while staging the layer), and about one and a half times (the layer fits, the
chunks in LMDB do not). A commit writes its layer after it is done, and only its chunks count
then: with one and a half times their size free, it must succeed, and a branch on it (which
needs the layer) gets the ENOSPC instead, with nothing recorded. Otherwise, in each case:

* the caller gets ``NoSpaceError`` whose errno is ENOSPC (not a bare OSError, not EIO);
* the operation left no trace: no new snapshot, the branch shows and reports what it did;
* every earlier snapshot reads back exactly, and a branch on it shows it;
* fsck of the closed store is clean, still with the disk full;
* after the ballast is deleted, the very same operation succeeds and is exact.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import (assert_fsck_clean, assert_same_view, check_live, dir_view, force_unmount_below,
                      loop_ext4, needs_loop, open_store, run_child, snapshot_view)
from support.loopdev import mounted_image
from cascowfs import overlay
from cascowfs.errors import CascowfsError, NoSpaceError
from cascowfs.fsck import fsck_store
from cascowfs.state import StateManager

pytestmark = needs_loop

DISK_MIB = 96
DATA_MIB = 16
LEVELS = {"full": 0.0, "half": 0.5, "one-and-a-half": 1.5}


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk with ballast files until about ``leave`` bytes are free (0: full)."""
    ballast = disk / "ballast"
    ballast.mkdir(exist_ok=True)
    os.sync()
    big = free_bytes(disk) - leave - (1 << 20)
    if big > 0:
        fd = os.open(ballast / "big", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, big)
        finally:
            os.close(fd)
    # top up block by block (fallocate stops short of the metadata it needs)
    i = 0
    chunk = b"\0" * 4096
    while free_bytes(disk) > leave + 4096:
        i += 1
        try:
            with open(ballast / f"top{i}", "wb") as fh:
                fh.write(chunk * max(1, min(256, (free_bytes(disk) - leave) // 4096)))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            break
    if leave == 0:  # and the last crumbs: nothing may be left at all
        for j in range(10_000):
            try:
                with open(ballast / f"crumb{j}", "wb") as fh:
                    fh.write(b"x" * 1024)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    os.sync()
    return ballast


@contextmanager
def _small_disk(tmp_path: Path, track_store) -> Iterator[tuple[Path, Path]]:
    """A fresh small ext4 (``DISK_MIB``) and the path of a store on it, whose mounts go when
    the test ends, however it ends."""
    with loop_ext4(tmp_path / "fs", DISK_MIB) as disk:
        store = track_store(disk / "store")
        try:
            yield disk, store
        finally:
            force_unmount_below(store)


def unfill(ballast: Path) -> None:
    for entry in os.listdir(ballast):
        (ballast / entry).unlink(missing_ok=True)
    os.sync()


def random_tree(root: Path, total: int, seed: int) -> Path:
    rng = random.Random(seed)
    (root / "d").mkdir(parents=True)
    written = i = 0
    while written < total:
        size = min(total - written, rng.choice([3_000, 100_000, 1_500_000]))
        (root / ("d" if i % 2 else "") / f"f{i}").write_bytes(rng.randbytes(size))
        written += size
        i += 1
    os.symlink("d", root / "link")
    return root


def reopen(sm):
    """Close and reopen: the WAL is checkpointed (emptied) at open, so on a full disk even
    the operation's first WAL record has no block to go to."""
    store = sm.store
    sm.close()
    return StateManager.open(store)


def earlier_state_intact(sm, views: dict) -> None:
    for sid, view in views.items():
        assert_same_view(snapshot_view(sm, sid), view, f"earlier snapshot {sid}")


@pytest.mark.parametrize("level", list(LEVELS))
def test_import_on_a_full_disk(tmp_path, level, track_store):
    src = random_tree(tmp_path / "src", DATA_MIB << 20, seed=1)
    src_view = dir_view(src)
    small = random_tree(tmp_path / "small", 200_000, seed=2)
    with _small_disk(tmp_path, track_store) as (disk, store):
        sm = StateManager.open(store)
        try:
            sm.import_tree(small, "early")
            views = {"early": snapshot_view(sm, "early")}
            sm = reopen(sm)
            ballast = fill(disk, int(LEVELS[level] * (DATA_MIB << 20)))
            with pytest.raises(NoSpaceError) as info:
                sm.import_tree(src, "big")
            assert info.value.errno == errno.ENOSPC
            assert [s.id for s in sm.snapshots()] == ["early"]
            earlier_state_intact(sm, views)
        finally:
            sm.close()
        assert_fsck_clean(store, deep=True)  # with the disk still full

        unfill(ballast)
        with open_store(store) as sm:
            earlier_state_intact(sm, views)
            assert sm.import_tree(src, "big") == "big"
            assert_same_view(snapshot_view(sm, "big"), src_view, "import after space was freed")
            tree = sm.create_branch("check", "big").tree
            assert_same_view(dir_view(tree), src_view, "a branch on the import")
            sm.discard("check")
            check_live(sm, deep=True)


@pytest.mark.parametrize("level", list(LEVELS))
def test_commit_on_a_full_disk(tmp_path, level, track_store):
    small = random_tree(tmp_path / "small", 200_000, seed=3)
    with _small_disk(tmp_path, track_store) as (disk, store):
        sm = StateManager.open(store)
        try:
            sm.import_tree(small, "base")
            tree = sm.create_branch("work", "base").tree
            (tree / "note").write_bytes(b"small")
            sm.commit("work", "early")
            views = {s: snapshot_view(sm, s) for s in ("base", "early")}
            random_tree(tree / "new", DATA_MIB << 20, seed=4)  # the edit to commit
            os.unlink(tree / "note")
            branch_view = dir_view(tree)
            status = [c.line() for c in sm.status("work")]
            sm = reopen(sm)
            ballast = fill(disk, int(LEVELS[level] * (DATA_MIB << 20)))
            chunks_fit = LEVELS[level] > 1
            if chunks_fit:  # done; its layer, written next, does not fit
                assert sm.commit("work", "c1") == "c1"
                sm.settle()
                assert_same_view(snapshot_view(sm, "c1"), branch_view, "commit on a full disk")
                with pytest.raises(NoSpaceError) as info:
                    sm.create_branch("check", "c1")
                assert [b.name for b in sm.branches()] == ["work"]
                views["c1"] = snapshot_view(sm, "c1")
            else:
                with pytest.raises(NoSpaceError) as info:
                    sm.commit("work", "c1")
                assert sorted(s.id for s in sm.snapshots()) == ["base", "early"]
                assert sm.branch("work").parent == "early"
                assert [c.line() for c in sm.status("work")] == status
            assert info.value.errno == errno.ENOSPC
            assert_same_view(dir_view(tree), branch_view, "branch after the failed operation")
            earlier_state_intact(sm, views)
        finally:
            sm.close()
        assert_fsck_clean(store, deep=True)  # with the disk still full

        unfill(ballast)
        with open_store(store) as sm:
            earlier_state_intact(sm, views)
            assert_same_view(dir_view(tree), branch_view, "branch after reopen")
            if not chunks_fit:
                assert sm.commit("work", "c1") == "c1"
            assert_same_view(snapshot_view(sm, "c1"), branch_view, "commit after space was freed")
            check = sm.create_branch("check", "c1").tree
            assert_same_view(dir_view(check), branch_view, "a branch on the commit")
            sm.discard("check")
            check_live(sm, deep=True)


def test_every_state_change_on_a_completely_full_disk(tmp_path, track_store):
    """With not one free block, each state change either succeeds or raises NoSpaceError
    (discard and prune free space, so succeeding is the better answer for them), and leaves a
    consistent store; once space is back every one of them succeeds."""
    small = random_tree(tmp_path / "small", 300_000, seed=5)
    with _small_disk(tmp_path, track_store) as (disk, store):
        sm = StateManager.open(store)
        try:
            sm.import_tree(small, "base")
            sm.import_tree(small, "spare")
            sm.import_tree(small, "old")
            tree = sm.create_branch("work", "base").tree
            (tree / "edit").write_bytes(b"edit")
            sm.create_branch("gone", "base")
            sm.create_branch("moving", "base")
            rolled = sm.create_branch("rolled", "base").tree
            (rolled / "tried").write_bytes(b"an agent's attempt")
            views = {s: snapshot_view(sm, s) for s in ("base", "spare")}
            sm = reopen(sm)
            ballast = fill(disk, 0)
            attempts = {
                "create_branch": lambda: sm.create_branch("new", "base"),
                "commit": lambda: sm.commit("work", "c1"),
                "rebase": lambda: sm.rebase("moving", "spare"),
                "reset": lambda: sm.reset("rolled", "spare"),
                "discard": lambda: sm.discard("gone"),
                "prune": lambda: sm.prune("old"),
            }
            outcome = {}
            for what, call in attempts.items():
                try:
                    call()
                    outcome[what] = "ok"
                except NoSpaceError as exc:
                    assert exc.errno == errno.ENOSPC
                    outcome[what] = "ENOSPC"
                except OSError as exc:
                    raise AssertionError(f"{what} on a full disk raised a bare {exc!r}, "
                                         "not NoSpaceError") from exc
            earlier_state_intact(sm, {s: v for s, v in views.items()
                                      if s in {x.id for x in sm.snapshots()}})
            # a reset refused for want of space leaves the branch as it was, changes
            # and mount included; one that succeeded shows its new parent's tree
            tried = (rolled / "tried").exists()
            assert tried == (outcome["reset"] == "ENOSPC"), outcome
            assert sm.branch("rolled").parent == ("base" if tried else "spare")
        finally:
            sm.close()
        assert_fsck_clean(store, deep=True)
        unfill(ballast)
        with open_store(store) as sm:
            names = {b.name for b in sm.branches()}
            if "new" not in names:
                sm.create_branch("new", "base")
            if "c1" not in {s.id for s in sm.snapshots()}:
                sm.commit("work", "c1")
            if sm.branch("moving").parent != "spare":
                sm.rebase("moving", "spare")
            if sm.branch("rolled").parent != "spare":
                sm.reset("rolled", "spare")
            assert not (sm.branch("rolled").tree / "tried").exists()
            if "gone" in names:
                sm.discard("gone")
            if "old" in {s.id for s in sm.snapshots()}:
                sm.prune("old")
            check_live(sm, deep=True)


def test_a_store_on_a_full_disk_opens_to_free_space(tmp_path, track_store):
    """The documented way out of a full disk (prune, discard, gc) needs the store open, and
    every open used to write a probe image first: after a restart on a full disk the daemon,
    fsck and gc all failed with ENOSPC. A fresh process (no probe cached) opens it, prunes,
    collects and checks it."""
    small = random_tree(tmp_path / "small", 300_000, seed=6)
    with _small_disk(tmp_path, track_store) as (disk, store):
        sm = StateManager.open(store)
        try:
            sm.import_tree(small, "base")
            sm.import_tree(random_tree(tmp_path / "more", 2 << 20, seed=7), "old")
            sm.create_branch("work", "base")
        finally:
            sm.close()  # as a daemon's unmount: the branch stays mounted
        fill(disk, 0)
        for step in ("sm.prune('old')", "print(sm.gc())"):  # the open between empties the trash
            opened = run_child(
                "import sys\nfrom cascowfs.state import StateManager\n"
                f"sm = StateManager.open(sys.argv[1])\n{step}\nsm.close()\n", str(store))
            assert opened.returncode == 0, opened.stderr
        checked = run_child("import sys\nfrom cascowfs.cli import main\n"
                            "sys.exit(main(['fsck', sys.argv[1]]))\n", str(store))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert free_bytes(disk) > 1 << 20  # the prune and collection gave space back
        with open_store(store) as sm:
            assert [s.id for s in sm.snapshots()] == ["base"]
            assert_same_view(snapshot_view(sm, "base"), dir_view(small), "base")


# ---------------------------------------------------------------------------------------------
# no inode left for a branch's overlay (overlayfs makes directories in its work directory)
# ---------------------------------------------------------------------------------------------
@contextmanager
def _disk_of_few_inodes(tmp_path: Path, track_store) -> Iterator[tuple[Path, Path]]:
    """A fresh 64 MiB ext4 of 2,000 inodes, quick to run out of, and a store on it."""
    img = tmp_path / "fs" / "disk.img"
    img.parent.mkdir(parents=True)
    with open(img, "wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", "2000", str(img)],
                   check=True, capture_output=True)
    try:
        with mounted_image(img, tmp_path / "fs" / "disk") as disk:
            store = track_store(disk / "store")
            try:
                yield disk, store
            finally:
                force_unmount_below(store)
    finally:
        img.unlink(missing_ok=True)


def use_up_inodes(disk: Path) -> Path:
    """Create empty files until no inode is left; returns their directory."""
    ballast = disk / "inodes"
    ballast.mkdir(exist_ok=True)
    for i in itertools.count():
        try:
            (ballast / f"i{i}").touch()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return ballast


def _out_of_inodes_once_mounting(sm: StateManager, disk: Path) -> list[Path]:
    """Run out of inodes when the next branch overlay is about to be made: every directory
    the operation needs before it is made, the overlay's own are not."""
    keep_mounted = sm.layers.keep_mounted
    used: list[Path] = []

    def then_full(chain):
        if not used:
            used.append(use_up_inodes(disk))
        return keep_mounted(chain)

    sm.layers.keep_mounted = then_full  # type: ignore[method-assign]
    return used


@pytest.mark.parametrize("op", ["reset", "rebase", "branch"])
def test_an_overlay_that_cannot_be_made_refuses_the_op_and_changes_nothing(
        tmp_path, track_store, op):
    """The overlay of a reset, re-base or new branch needs inodes of its own. It is made
    before the APPLY: on a full disk the op fails with ENOSPC and the branch is as it was,
    mounted, changes included (it used to be repointed and left unmounted, so a write went
    into the bare directory and the next commit took the new parent's tree instead)."""
    src = random_tree(tmp_path / "src", 100_000, seed=8)
    with _disk_of_few_inodes(tmp_path, track_store) as (disk, store):
        sm = StateManager.open(store)
        try:
            sm.import_tree(src, "root")
            tree = sm.create_branch("b", "root").tree
            (tree / "mine").write_text("v1")
            sm.commit("b", "s1")
            if op == "reset":
                (tree / "uncommitted").write_text("agent work")
            view = dir_view(tree)
            used = _out_of_inodes_once_mounting(sm, disk)
            call = {"reset": lambda: sm.reset("b", "root"),
                    "rebase": lambda: sm.rebase("b", "root"),
                    "branch": lambda: sm.create_branch("c", "s1")}[op]
            with pytest.raises(CascowfsError) as info:
                call()
            assert used and info.value.errno == errno.ENOSPC, info.value
            assert [b.name for b in sm.branches()] == ["b"]
            assert sm.branch("b").parent == "s1"
            assert os.path.ismount(tree)
            assert_same_view(dir_view(tree), view, "branch after the refused operation")
            assert sm.wal.pending() == []
            unfill(used[0])
            (tree / "after").write_text("written after the refused operation")
            sm.commit("b", "s2")
            assert_same_view(snapshot_view(sm, "s2"), dir_view(tree), "the next commit")
            assert "uncommitted" in os.listdir(tree) or op != "reset"
            call()
            check_live(sm, deep=True)
        finally:
            sm.close()
        assert_fsck_clean(store)


def test_a_full_disk_leaves_a_branch_unmounted_and_the_store_serving(tmp_path, track_store):
    """A branch whose overlay cannot be mounted at open (no inode left) does not keep the
    store from opening: it is reported, nothing can be written at its mount point, space can
    be freed, and the next commit of it mounts it once there is room, its work intact."""
    src = random_tree(tmp_path / "src", 100_000, seed=9)
    with _disk_of_few_inodes(tmp_path, track_store) as (disk, store):
        sm = StateManager.open(store)
        try:
            sm.import_tree(src, "root")
            sm.import_tree(src, "old")
            tree = sm.create_branch("b", "root").tree
            (tree / "work").write_text("uncommitted")
            view = dir_view(tree)
        finally:
            sm.close(unmount_branches=True)
        ballast = use_up_inodes(disk)
        sm = StateManager.open(store)
        try:
            with pytest.raises(OSError) as info:
                (tree / "lost").write_text("into the bare mount point")
            assert info.value.errno == errno.EROFS
            with pytest.raises(CascowfsError, match="branch b is not mounted") as why:
                sm.status("b")
            assert why.value.errno == errno.ENOSPC
            sm.prune("old")  # freeing space works
        finally:
            sm.close()
        report = fsck_store(store, deep=False)
        assert report.problems == ["invariant 4: branch b is not mounted"], report.problems
        unfill(ballast)
        with open_store(store) as sm:
            assert_same_view(dir_view(tree), view, "branch mounted at the next open")
        sm = StateManager.open(store)  # unmounted again, then mounted by the next commit
        try:
            sm.unmount_branch("b")
            sm.leave_unmounted("b", NoSpaceError("store disk is full"))
            assert sm.commit("b", "c1") == "c1"
            assert os.path.ismount(tree)
            assert_same_view(dir_view(tree), view, "branch mounted by its commit")
            assert_same_view(snapshot_view(sm, "c1"), view, "its commit")
            check_live(sm)
        finally:
            sm.close()
        assert_fsck_clean(store)


def test_a_branch_left_unmounted_without_a_placeholder_has_no_mount_point(
    tmp_path, track_store, monkeypatch
):
    """A branch whose overlay, and then the read-only placeholder, could not be mounted (a
    mount table at fs.mount-max refuses both) used to leave its mount point a bare directory
    of the store, where root's files landed; the mount point goes instead, and the next
    commit mounts the branch again with its work."""
    store = track_store(tmp_path / "store")
    sm = StateManager.open(store)
    try:
        tree = sm.create_branch("b").tree
        (tree / "work").write_text("uncommitted")
        view = dir_view(tree)
        sm.unmount_branch("b")

        def table_full(target):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))

        monkeypatch.setattr(overlay, "mount_placeholder", table_full)
        sm.leave_unmounted("b", NoSpaceError("the mount table is full"))
        monkeypatch.undo()
        with pytest.raises(FileNotFoundError):
            (tree / "lost").write_text("into the bare mount point")
        assert sm.commit("b", "c1") == "c1"
        assert os.path.ismount(tree)
        assert_same_view(dir_view(tree), view, "branch mounted by its commit")
        assert not os.path.exists(tree / "lost")
    finally:
        sm.close()
    assert_fsck_clean(store)
