"""The trash (``trash.py``): a path goes at once by rename, its content later; a mount moved
into the trash is detached before anything under it is deleted."""

from __future__ import annotations

import os
import signal
import threading

import pytest

import conftest
from conftest import needs_overlay
from cascowfs import overlay
from cascowfs.trash import Trash


@pytest.fixture
def trash(tmp_path):
    (tmp_path / "trash").mkdir()
    return Trash(tmp_path / "trash")


def test_a_path_put_in_the_trash_is_gone_at_once_and_deleted_when_emptied(trash, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("x")
    (tmp_path / "file").write_text("y")
    trash.put(tree)
    trash.put(tmp_path / "file")
    assert not tree.exists() and not (tmp_path / "file").exists()
    assert len(os.listdir(trash.path)) == 2
    trash.empty()
    assert os.listdir(trash.path) == []


def test_two_paths_of_one_name_both_fit_in_the_trash(trash, tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "upper").mkdir(parents=True)
        trash.put(tmp_path / parent / "upper")
    assert len(os.listdir(trash.path)) == 2


def test_a_missing_path_is_ignored(trash, tmp_path):
    trash.put(tmp_path / "nothing")
    trash.put_after_apply([tmp_path / "nothing"], tmp_path)
    assert os.listdir(trash.path) == []


@needs_overlay
def test_what_cannot_be_moved_after_an_apply_stays_without_failing(trash, tmp_path, caplog):
    """A mount point cannot be renamed (EBUSY): the op it belongs to is durable already, so
    the trash logs it and leaves it for the next open."""
    lower, upper, work, target = (tmp_path / d for d in ("lower", "upper", "work", "tree"))
    for d in (lower, upper, work, target):
        d.mkdir()
    conftest._STORES.append(tmp_path)
    overlay.mount_overlay(target, [lower], upper, work)
    try:
        trash.put_after_apply([target], tmp_path)
        assert target.is_dir() and "stays until the next open" in caplog.text
        assert os.listdir(trash.path) == []
    finally:
        conftest.force_unmount_below(tmp_path)


@needs_overlay
def test_a_mount_in_the_trash_is_detached_before_its_tree_is_deleted(trash, tmp_path):
    """As a discarded branch goes: its directory, holding the mount point, is moved (and the
    open's first round finds the mount in the mount table, named or not)."""
    branch_dir = _mounted_branch_dir(tmp_path)
    try:
        trash.put(branch_dir)
        trash.empty()
        _assert_emptied(trash, tmp_path)
    finally:
        conftest.force_unmount_below(tmp_path)


def _mounted_branch_dir(tmp_path):
    """A directory ``b`` holding an overlay mounted at ``b/tree``, as a branch's is."""
    lower = tmp_path / "lower"
    upper, work, target = (tmp_path / "b" / d for d in ("upper", "work", "tree"))
    for d in (lower, upper, work, target):
        d.mkdir(parents=True)
    (lower / "kept").write_text("the lower layer is not the trash's to delete")
    conftest._STORES.append(tmp_path)
    overlay.mount_overlay(target, [lower], upper, work)
    return tmp_path / "b"


def _assert_emptied(trash, tmp_path):
    """The trash is empty, nothing stays mounted, and the lower layer was left alone."""
    assert os.listdir(trash.path) == []
    assert not overlay.mounts_under(tmp_path)
    assert (tmp_path / "lower" / "kept").read_text().startswith("the lower layer")


@needs_overlay
def test_a_round_detaches_the_mount_points_named_without_reading_the_mount_table(
    trash, tmp_path, monkeypatch
):
    trash.empty()  # the open's round, which reads the mount table
    branch_dir = _mounted_branch_dir(tmp_path)
    try:
        trash.put(branch_dir, mount_points=("tree",))
        with monkeypatch.context() as patched:
            patched.setattr(overlay, "all_mounts", _no_mount_table)
            trash.empty()
        _assert_emptied(trash, tmp_path)
    finally:
        conftest.force_unmount_below(tmp_path)


def _no_mount_table():
    raise AssertionError("the round read the mount table")


@needs_overlay
def test_a_mount_nobody_named_keeps_its_tree_until_a_round_reads_the_mount_table(
    trash, tmp_path
):
    trash.empty()  # the open's round
    branch_dir = _mounted_branch_dir(tmp_path)
    try:
        trash.put(branch_dir)  # its mount point not named
        trash.empty()
        [left] = os.listdir(trash.path)  # rm never crosses into the mount
        assert len(overlay.mounts_under(trash.path)) == 1
        assert (trash.path / left / "tree" / "kept").is_file()  # and left its view alone
        (tmp_path / "later").mkdir()
        trash.put(tmp_path / "later")  # the next round's, which reads the table
        trash.empty()
        _assert_emptied(trash, tmp_path)
    finally:
        conftest.force_unmount_below(tmp_path)


def test_a_stopped_trash_leaves_its_content_to_the_next_open(trash, tmp_path):
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    trash.put(tmp_path / "tree")
    trash.stop()  # the daemon is closing
    trash.empty()
    assert len(os.listdir(trash.path)) == 1
    Trash(trash.path).empty()  # the next open's round
    assert os.listdir(trash.path) == []


def _children(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found += [int(p) for p in fh.read().split()]
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return found


def _is_rm(pid: int) -> bool:
    """Has child ``pid`` exec'd rm (a child stopped between fork and exec would hang Popen)?"""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip() == "rm"
    except FileNotFoundError:
        return False


def test_stop_ends_a_round_whose_rm_is_still_running(trash, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20000):  # long enough a deletion to catch its rm
        (tree / str(i)).touch()
    trash.put(tree)
    before = set(_children(os.getpid()))
    emptying = threading.Thread(target=trash.empty)
    emptying.start()
    rm = None
    while rm is None and emptying.is_alive():
        rm = next((p for p in set(_children(os.getpid())) - before if _is_rm(p)), None)
    if rm is None:
        emptying.join()
        pytest.skip("the rm child finished before it was seen")
    os.kill(rm, signal.SIGSTOP)  # it deletes nothing more, and would never end by itself
    trash.stop()
    emptying.join()
    assert os.listdir(trash.path) != []
    Trash(trash.path).empty()
    assert os.listdir(trash.path) == []


def test_two_threads_dropping_one_path_move_it_once_and_warn_of_nothing(trash, tmp_path, caplog):
    """A prune and the layer builder may both drop a layer that was being written: whichever
    moves it second finds it gone, which is what it wanted, not a failure to log."""
    tree = tmp_path / "layer"
    barrier = threading.Barrier(2)

    def drop() -> None:
        barrier.wait()
        trash.put_after_apply([tree], tmp_path)

    for _ in range(300):
        tree.mkdir()
        threads = [threading.Thread(target=drop) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not tree.exists()
    assert len(os.listdir(trash.path)) == 300
    assert "stays until the next open" not in caplog.text


def test_a_path_that_cannot_reach_a_missing_trash_is_an_error(trash, tmp_path):
    (tmp_path / "tree").mkdir()
    os.rmdir(trash.path)
    with pytest.raises(FileNotFoundError):
        trash.put(tmp_path / "tree")
    assert (tmp_path / "tree").is_dir()
