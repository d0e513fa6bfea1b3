"""Opening a store (``recovery.py``): reconciliation makes the disk and the mount table agree
with the recorded state, and an op logged but never applied leaves nothing behind."""

from __future__ import annotations

import os
import threading

import pytest

import conftest
from conftest import check_live, dir_view, needs_overlay
from cascowfs import durability, overlay, recovery
from cascowfs.errors import NoSpaceError, NotFoundError, StoreIOError
from cascowfs.layers import remove_within_filesystem

pytestmark = needs_overlay


def _source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_text(f"{i}\n")
    return src


def test_reconcile_restores_what_the_records_say_and_trashes_the_rest(tmp_path):
    with conftest.open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "base")
        tree = sm.create_branch("b", "base").tree
        (tree / "new").write_text("uncommitted")
        view = dir_view(tree)
        with sm.db.read() as txn:
            (lid,) = sm.catalog.snapshot(txn, "base").layers
        sm.unmount_branch("b")
        remove_within_filesystem(sm.layers.path(lid))  # a lost layer
        (sm.layers_dir / "0000000000").mkdir()  # a layer no record names
        (sm.staging_dir / "leftover").mkdir()  # an op in flight when the daemon died
        (sm.branches_dir / "gone").mkdir()  # a branch no record names
        recovery.reconcile(sm)
        assert dir_view(tree) == view  # mounted again, its upper kept
        assert [m.target for m in overlay.mounts_under(sm.branches_dir)] == [str(tree)]
        assert sorted(os.listdir(sm.layers_dir)) == [lid]
        assert os.listdir(sm.staging_dir) == []
        assert sorted(os.listdir(sm.branches_dir)) == ["b"]
        check_live(sm, deep=True)
        sm.discard("b")


def test_an_op_logged_but_never_applied_is_rolled_back_at_the_next_open(tmp_path):
    store = tmp_path / "store"
    with conftest.open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "base")
        op = sm.wal.prepare("import", id="half", layer="1111111111")
        (sm.staging_dir / op).mkdir()
        (sm.layers_dir / "1111111111").mkdir()  # placed, never recorded
    with conftest.open_store(store) as sm:
        assert sm.wal.pending() == []
        assert not sm.has_snapshot("half")
        assert os.listdir(sm.staging_dir) == [] and not (sm.layers_dir / "1111111111").exists()
        check_live(sm, deep=True)


def test_an_op_refused_inside_its_apply_is_finished_in_the_log(tmp_path):
    """Two prunes of one snapshot both pass the check made before their PREPARE; the second
    one's APPLY finds the snapshot gone (ENOENT). It changed nothing, so its record must be
    FINALIZEd: left open, fsck of the cleanly stopped store reported it unfinished."""
    store = tmp_path / "store"
    with conftest.open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "s")
        both_prepared = threading.Barrier(2, timeout=10)
        prepare = sm.wal.prepare

        def prepare_together(kind, **args):
            op = prepare(kind, **args)
            if kind == "prune":
                both_prepared.wait()
            return op

        sm.wal.prepare = prepare_together
        outcomes: list[str] = []

        def prune() -> None:
            try:
                sm.prune("s")
                outcomes.append("ok")
            except NotFoundError:
                outcomes.append("ENOENT")

        threads = [threading.Thread(target=prune) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["ENOENT", "ok"]
        assert sm.wal.pending() == []
        sm.wal.prepare = prepare
    conftest.assert_fsck_clean(store)


def _import_base_and_other(sm, tmp_path):
    """Snapshots ``base`` and ``other`` of two different trees (``which`` names each)."""
    for word in ("base", "other"):
        src = tmp_path / f"src-{word}"
        src.mkdir()
        (src / "which").write_text(f"{word}\n")
        sm.import_tree(src, word)


def _finalize_failing_for(sm, kind):
    """Make the FINALIZE of every ``kind`` op fail as an append past the log's preallocated
    end fails on a full disk; returns a function that undoes it."""
    prepare, finalize = sm.wal.prepare, sm.wal.finalize
    ops = set()

    def spying_prepare(k, **args):
        op = prepare(k, **args)
        if k == kind:
            ops.add(op)
        return op

    def failing_finalize(op):
        if op in ops:
            raise NoSpaceError("writing the write-ahead log: no space left (injected)")
        finalize(op)

    sm.wal.prepare, sm.wal.finalize = spying_prepare, failing_finalize

    def undo():
        sm.wal.prepare, sm.wal.finalize = prepare, finalize

    return undo


@pytest.mark.parametrize("kind, remade", [("reset", False), ("rebase", False), ("reset", True)])
def test_a_repoint_whose_finalize_failed_keeps_the_work_done_after_it(tmp_path, kind, remade):
    """A re-base or reset returns though its FINALIZE could not be written; the branch is
    worked in (or discarded and made again under its name: ``remade``), and the store is
    closed cleanly. The next open used to take the op for one killed before its SWITCH and
    remount the branch on a fresh upper directory, deleting that work."""
    store = tmp_path / "store"
    with conftest.open_store(store) as sm:
        _import_base_and_other(sm, tmp_path)
        sm.create_branch("work", "base")
        undo = _finalize_failing_for(sm, kind)
        getattr(sm, kind)("work", "other")
        undo()
        assert [op.kind for op in sm.wal.pending()] == [kind]
        if remade:
            sm.discard("work")
            sm.create_branch("work", "other")
        tree = sm.branch("work").tree
        (tree / "after").write_text("uncommitted work")
    with conftest.open_store(store) as sm:
        tree = sm.branch("work").tree
        assert (tree / "after").read_text() == "uncommitted work"
        assert (tree / "which").read_text() == "other\n"
        assert [c.line() for c in sm.status("work")] == ["A after"]
        assert sm.wal.pending() == []
        check_live(sm, deep=True)


def test_a_layer_rebuilt_in_place_is_on_the_disk_before_it_takes_its_name(
    tmp_path, monkeypatch
):
    """A lost layer is rebuilt under its own id and keeps its sync number, which the
    background sync may have covered already, so no later sync would take it to the disk:
    its files must be synced before its name is placed, or a power cut could leave torn
    files that no open rebuilds."""
    with conftest.open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "base")
        tree = sm.create_branch("b", "base").tree
        (tree / "f0").write_text("changed\n")
        sm.commit("b", "c1")
        sm.settle()
        sm.layers.sync()
        with sm.db.read() as txn:
            delta = sm.catalog.snapshot(txn, "c1").layers[0]
        assert delta not in sm.layers.unsynced()
        sm.unmount_branch("b")
        remove_within_filesystem(sm.layers.path(delta))
        staged = sm.staging_dir / f"rebuild-{delta}"
        synced_while_staged = []
        real = durability.syncfs

        def spying_syncfs(path):
            synced_while_staged.append(os.path.lexists(staged))
            real(path)

        monkeypatch.setattr(durability, "syncfs", spying_syncfs)
        recovery.reconcile(sm)
        monkeypatch.undo()
        assert sm.layers.path(delta).exists()
        assert True in synced_while_staged, "the rebuilt layer was never synced before its rename"
        check_live(sm, deep=True)



def _reset_failing_with_its_undo(sm):
    """A reset of branch ``work`` onto ``other`` fails before its APPLY (a failing disk), and
    putting the branch's own directories back fails too; returns the error it raised."""
    real_repoint, real_swap_back = sm.repoint_branch, sm.swap_back
    swap_backs = iter([True])

    def failing_repoint(*args, **kw):
        raise StoreIOError("store disk failed (injected)")

    def swap_back_failing_once(name, staged):
        if next(swap_backs, False):
            raise StoreIOError("restoring the branch's directories: EIO (injected)")
        real_swap_back(name, staged)

    sm.repoint_branch, sm.swap_back = failing_repoint, swap_back_failing_once
    with pytest.raises(StoreIOError) as raised:
        sm.reset("work", "other")
    sm.repoint_branch = real_repoint
    return raised.value


@pytest.mark.parametrize("then", ["commit", "reopen"])
def test_a_reset_that_cannot_put_the_branch_back_keeps_its_changes(tmp_path, then):
    """A reset fails before its APPLY, and putting the branch's own directories back fails
    too. They used to go to the trash with the op's staging, under the overlay still using
    them: the branch's uncommitted changes were deleted. They must survive, for the branch's
    next commit (which puts them back first) or the next open."""
    store = tmp_path / "store"
    with conftest.open_store(store) as sm:
        _import_base_and_other(sm, tmp_path)
        tree = sm.create_branch("work", "base").tree
        (tree / "mine").write_text("uncommitted")
        error = _reset_failing_with_its_undo(sm)
        sm.settle()  # empties the trash
        assert (tree / "mine").read_text() == "uncommitted"
        if then == "commit":
            sm.commit("work", "c1")
            assert [c.line() for c in sm.diff("base", "c1")] == ["A mine"]
            assert sm.wal.pending() == []
            assert [c.line() for c in sm.status("work")] == []
            sm.reset("work", "other")
            assert (sm.branch("work").tree / "which").read_text() == "other\n"
            check_live(sm, deep=True)
    if then == "reopen":
        with conftest.open_store(store) as sm:
            assert sm.branch("work").parent == "base"
            assert [c.line() for c in sm.status("work")] == ["A mine"]
            assert (sm.branch("work").tree / "mine").read_text() == "uncommitted"
            assert sm.wal.pending() == []
            check_live(sm, deep=True)
    assert "store disk failed" in error.message  # the op's own error, not its undo's


def test_the_directories_of_a_discarded_branch_never_go_under_one_made_again(tmp_path):
    """A branch whose own directories wait in staging after a failed reset is discarded, on
    a disk so sick that neither its staging goes nor the reset's record is finished, and a
    branch is made again under its name. The next open must not put the discarded branch's
    directories back under the new one (the record names the branch's creation time)."""
    store = tmp_path / "store"
    with conftest.open_store(store) as sm:
        _import_base_and_other(sm, tmp_path)
        tree = sm.create_branch("work", "base").tree
        (tree / "mine").write_text("uncommitted")
        _reset_failing_with_its_undo(sm)
        finalize, drop_staged = sm.wal.finalize, sm._drop_staged

        def failing_finalize(op):
            raise NoSpaceError("writing the write-ahead log: no space left (injected)")

        sm.wal.finalize, sm._drop_staged = failing_finalize, lambda staged: None
        sm.discard("work")
        sm.wal.finalize, sm._drop_staged = finalize, drop_staged
        tree = sm.create_branch("work", "other").tree
        (tree / "theirs").write_text("the new branch's")
    with conftest.open_store(store) as sm:
        tree = sm.branch("work").tree
        assert [c.line() for c in sm.status("work")] == ["A theirs"]
        assert not (tree / "mine").exists()
        assert (tree / "which").read_text() == "other\n"
        assert sm.wal.pending() == []
        check_live(sm, deep=True)
