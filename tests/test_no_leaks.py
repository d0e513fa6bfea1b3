"""Nothing leaks (docs/architecture.md, Guarantees): no mount, staging, trash, process, thread left
behind by the engine's operations, by their failures, or by closing a store. (The session-end
hook in conftest.py checks the same for the whole test run.)"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from conftest import (assert_fsck_clean, check_live, descendant_processes, force_unmount_below,
                      mounts_below, needs_overlay, open_store)
from cascowfs.errors import CascowfsError, StoreIOError
from cascowfs.state import StateManager

pytestmark = needs_overlay


def _cascowfs_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("cascowfs")]


def _source(tmp_path, files: int = 50):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(files):
        (src / ("d" if i % 2 else "") / f"f{i}").write_bytes(os.urandom(100 + i * 997))
    return src


@pytest.fixture
def store(tmp_path):
    """A store path whose mounts are removed after the test, whatever happened (the tests
    below check themselves that the engine left none)."""
    path = tmp_path / "store"
    try:
        yield path
    finally:
        force_unmount_below(path)


def test_discard_and_close_leave_nothing(tmp_path, store):
    threads_before = _cascowfs_threads()
    sm = StateManager.open(store)
    try:
        sm.import_tree(_source(tmp_path), "base")
        trees = [sm.create_branch(f"b{i}", "base").tree for i in range(5)]
        for t in trees:
            for dirpath, _, files in os.walk(t):  # a branch that read its whole tree
                for f in files:
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        fh.read()
            (t / "new").write_bytes(b"x")
        for i in range(5):
            sm.discard(f"b{i}")
            assert not os.path.lexists(store / "branches" / f"b{i}"), "discarded branch's directory"
            assert not mounts_below(store / "branches" / f"b{i}")
        sm.prune("base")
    finally:
        sm.close()
    assert not mounts_below(store), f"mounts left after close: {mounts_below(store)}"
    for d in ("branches", "layers", "staging"):
        assert os.listdir(store / d) == [], f"{d}/ not empty after close: {os.listdir(store / d)}"
    assert _cascowfs_threads() == threads_before, "background thread still running after close"
    assert_fsck_clean(store)
    with open_store(store) as sm:  # the trash's files go at the next open, in the background
        sm.settle()
        assert os.listdir(store / "trash") == [], "trash not emptied after the next open"


def test_close_with_unmount_branches_unmounts_every_branch(store):
    sm = StateManager.open(store)
    try:
        for i in range(3):
            sm.create_branch(f"b{i}")
        assert len(mounts_below(store)) == 3
    finally:
        sm.close(unmount_branches=True)
    assert not mounts_below(store)
    # and they come back, with their contents, at the next open
    with open_store(store) as sm2:
        assert len(mounts_below(store)) == 3
        check_live(sm2)


def test_a_big_import_leaves_no_worker_process(tmp_path, monkeypatch):
    """Big imports fan out to worker processes; none may outlive the import."""
    from cascowfs import import_workers

    monkeypatch.setattr(import_workers, "PROCESS_POOL_MIN_BYTES", 0)  # take the process path at once
    src = _source(tmp_path, files=300)
    with open_store(tmp_path / "store") as sm:
        before = {p for p, _, _ in descendant_processes(os.getpid())}
        sm.import_tree(src, "big")
        deadline = time.monotonic() + 10
        while True:
            left = [(p, c) for p, _, c in descendant_processes(os.getpid()) if p not in before]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not left, f"worker processes left after import: {left}"
        assert os.listdir(sm.store / "staging") == []
        tree = sm.create_branch("check", "big").tree
        assert sorted(os.listdir(tree)) == sorted(os.listdir(src))
        check_live(sm)


def test_failed_operations_leave_no_staging_and_no_pending_op(tmp_path, store, monkeypatch):
    """An operation that fails half-way (here: the disk returns EIO while the commit reads the
    branch, and the import source vanishes) is rolled back at once: no staging directory, no
    unfinished WAL record, no orphan object, and the same operation works afterwards."""
    import cascowfs.state as state_mod

    src = _source(tmp_path)
    sm = StateManager.open(store)
    try:
        sm.import_tree(src, "base")
        tree = sm.create_branch("b", "base").tree
        (tree / "new").write_bytes(os.urandom(300_000))
        real = state_mod.apply_upper

        def failing(*args, **kw):
            real(*args, **kw)  # write the objects first, so there is something to roll back
            raise OSError(errno.EIO, "injected I/O error")

        monkeypatch.setattr(state_mod, "apply_upper", failing)
        with pytest.raises(StoreIOError) as info:
            sm.commit("b", "c1")
        assert info.value.errno == errno.EIO
        monkeypatch.setattr(state_mod, "apply_upper", real)
        assert "c1" not in {s.id for s in sm.snapshots()}

        def vanishing(*args, **kw):
            raise FileNotFoundError(errno.ENOENT, "source vanished")

        monkeypatch.setattr(state_mod, "scan_directory", vanishing)
        with pytest.raises(CascowfsError):
            sm.import_tree(src, "again")
        monkeypatch.undo()

        assert os.listdir(store / "staging") == [], "staging left by a failed operation"
        assert sm.wal.pending() == [], "a failed operation left an unfinished WAL record"
        check_live(sm)
        assert sm.commit("b", "c1") == "c1"
        assert sm.import_tree(src, "again") == "again"
    finally:
        sm.close()
    assert_fsck_clean(store)
    with open_store(store):
        pass
