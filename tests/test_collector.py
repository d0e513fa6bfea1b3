"""The mark-and-sweep collector (collector.py) on a real LMDB store, no mounts needed: what it
marks, the order it deletes in, what a running cycle protects, and the marking child."""

from __future__ import annotations

import json
import stat
import threading
import time

import pytest

from cascowfs import cas, collector
from cascowfs.errors import StoreIOError
from cascowfs.model import Entry
from cascowfs.gate import OpGate
from cascowfs.trees import tree_objects
from cascowfs.tuning import Tuning
from conftest import check_live, open_store, snapshot_view


def _file(content: cas.ContentStore, data: bytes) -> bytes:
    prepared = cas.prepare_content(data)
    content.db.write(lambda txn: content.put_objects(txn, prepared.objects))
    return prepared.content_id


def _tree(content: cas.ContentStore, files: dict[bytes, bytes]) -> bytes:
    """A stored directory naming ``files`` (name -> content id); paged if it is large."""
    entries = {n: Entry(n, stat.S_IFREG | 0o644, 0, 0, 1, 1, ref) for n, ref in files.items()}
    top, objects = tree_objects(entries)
    content.db.write(lambda txn: content.put_objects(txn, objects))
    return top


def _set_snapshot(content: cas.ContentStore, sid: str, root: bytes | None) -> None:
    def put(txn):
        if root is None:
            txn.delete(sid.encode(), db=content.db.db("snapshots"))
        else:
            txn.put(sid.encode(), json.dumps({"root": root.hex()}).encode(),
                    db=content.db.db("snapshots"))
    content.db.write(put)


def _garbage(content: cas.ContentStore) -> list[bytes]:
    with content.db.read() as txn:
        return collector.garbage(txn, content.db.dbs)


def _all_ids(content: cas.ContentStore) -> set[bytes]:
    with content.db.read() as txn:
        return set(content.iter_object_ids(txn))


def _assert_parents_first(content: cas.ContentStore, order: list[bytes]) -> None:
    position = {oid: i for i, oid in enumerate(order)}
    with content.db.read() as txn:
        for oid in order:
            for child in cas.children_of(txn.get(oid, db=content.objects)):
                if child in position:
                    assert position[oid] < position[child], "a child comes before its parent"


def test_what_a_root_reaches_lives_and_the_rest_goes_parents_first(content):
    shared = _file(content, b"shared " * 100)
    only_old = _file(content, b"old " * 100)
    big = _file(content, bytes(range(256)) * 2000)  # a chunk list over chunks of their own
    old = _tree(content, {b"s": shared, b"o": only_old, b"b": big})
    new = _tree(content, {b"s": shared})
    _set_snapshot(content, "old", old)
    _set_snapshot(content, "new", new)
    assert _garbage(content) == []

    _set_snapshot(content, "old", None)  # the prune
    dead = _garbage(content)
    with content.db.read() as txn:
        reached_by_new = collector.reach(txn, content.objects, [new])
    assert set(dead) == _all_ids(content) - reached_by_new
    assert old in dead and only_old in dead and big in dead and shared not in dead
    assert dead[0] == old
    _assert_parents_first(content, dead)

    removed, finished = collector.sweep(content.db, content, dead, 2)
    assert (removed, finished) == (len(dead), True)
    assert _all_ids(content) == reached_by_new
    assert content.read(shared) == b"shared " * 100


def test_paged_directories_are_marked_and_swept_through_their_pages(content):
    files = {f"f{i:03d}".encode(): _file(content, f"content {i}".encode() * 20) for i in range(200)}
    top = _tree(content, files)
    _set_snapshot(content, "s", top)
    assert _garbage(content) == []
    _set_snapshot(content, "s", None)
    dead = _garbage(content)
    assert set(dead) == _all_ids(content)
    _assert_parents_first(content, dead)
    collector.sweep(content.db, content, dead, 7)
    assert _all_ids(content) == set()


def test_a_sweep_keeps_what_was_stored_again_since_the_cycle_began(content):
    """A commit that stores content equal to garbage finds it present (dedup) and names it:
    the sweep must keep it, and the pack its chunk points into, though the marking saw both
    unreachable."""
    data = b"reborn " * 100
    gone = _file(content, data)
    _set_snapshot(content, "s", _tree(content, {b"f": gone}))
    _set_snapshot(content, "s", None)
    content.protect()
    try:
        dead = _garbage(content)
        with content.db.read() as txn:
            pack = cas.children_of(txn.get(gone, db=content.objects))
        assert gone in dead and pack and pack[0] in dead
        assert _file(content, data) == gone  # stored again: present, so nothing is written
        new = _tree(content, {b"g": gone})
        _set_snapshot(content, "t", new)
        collector.sweep(content.db, content, dead, 1)
    finally:
        content.unprotect()
    assert content.read(gone) == data
    assert _garbage(content) == []  # everything left is reachable again: nothing dangles


def test_without_protection_the_same_sweep_would_delete_it(content):
    """The test above can fail: unprotected, the stored-again object goes."""
    data = b"reborn " * 100
    gone = _file(content, data)
    _set_snapshot(content, "s", _tree(content, {b"f": gone}))
    _set_snapshot(content, "s", None)
    dead = _garbage(content)
    _file(content, data)
    collector.sweep(content.db, content, dead, 1)
    with content.db.read() as txn:
        assert txn.get(gone, db=content.objects) is None


def test_a_sweep_stops_when_asked_and_reports_it_unfinished(content):
    files = {f"f{i}".encode(): _file(content, f"x{i}".encode() * 50) for i in range(20)}
    _set_snapshot(content, "s", _tree(content, files))
    _set_snapshot(content, "s", None)
    dead = _garbage(content)
    slices = []
    removed, finished = collector.sweep(content.db, content, dead, 3,
                                        stop=lambda: len(slices) >= 2, done=slices.append)
    assert not finished and removed == 6 and len(_all_ids(content)) == len(dead) - 6


def test_the_marking_child_finds_what_the_thread_finds(content):
    keep = _file(content, b"keep " * 100)
    for i in range(30):
        _file(content, f"garbage {i}".encode() * 40)
    _set_snapshot(content, "s", _tree(content, {b"k": keep, b"l": _file(content, b"x" * 300_000)}))
    _set_snapshot(content, "gone", _tree(content, {b"g": _file(content, b"gone" * 100)}))
    _set_snapshot(content, "gone", None)
    in_thread = _garbage(content)
    in_child = collector.garbage_from_child(str(content.db.path))
    assert sorted(in_child) == sorted(in_thread) and len(in_child) > 30
    _assert_parents_first(content, in_child)


def test_the_marking_child_is_stopped_when_cancelled(content):
    with pytest.raises(StoreIOError, match="cancelled"):
        collector.garbage_from_child(str(content.db.path), lambda: True)


def test_a_cycle_waits_for_the_operations_running_when_it_starts():
    gate = OpGate()
    started, release = threading.Event(), threading.Event()

    def op():
        with gate.running():
            started.set()
            release.wait()

    older = threading.Thread(target=op)
    older.start()
    started.wait()
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (gate.wait_for_running(), waited.set()))
    waiter.start()
    time.sleep(0.2)
    assert not waited.is_set()
    with gate.running():  # an operation started later does not hold the cycle up
        release.set()
        older.join()
        assert waited.wait(5)
    waiter.join()


# -- on a StateManager with real mounts ---------------------------------------------------------
def _objects(sm) -> set[bytes]:
    with sm.db.read() as txn:
        return set(sm.content.iter_object_ids(txn))


def test_content_committed_while_a_collection_runs_survives_it(sm, tmp_path, monkeypatch):
    """A commit between a cycle's marking and its sweep stores content that only a pruned
    snapshot had (so it is found present and not written): the sweep must keep it."""
    payload = b"only the pruned snapshot had this\n" * 30
    src = tmp_path / "src"
    src.mkdir()
    (src / "p.txt").write_bytes(payload)
    sm.import_tree(src, "old")
    tree = sm.create_branch("b").tree
    sm.prune("old")
    marked = collector.garbage

    def garbage_then_a_commit(txn, dbs, *release):
        dead = marked(txn, dbs, *release)
        (tree / "p.txt").write_bytes(payload)
        sm.commit("b", "new")
        return dead

    monkeypatch.setattr(collector, "garbage", garbage_then_a_commit)
    sm.collect()
    monkeypatch.undo()
    assert snapshot_view(sm, "new")[b"p.txt"].data == payload
    check_live(sm)
    sm.settle()  # a cycle that sees it reachable keeps it too
    assert snapshot_view(sm, "new")[b"p.txt"].data == payload


def test_the_background_collector_takes_what_a_prune_dropped(tmp_path):
    with open_store(tmp_path / "store", tuning=Tuning(collect_after_seconds=0.05)) as sm:
        _background_collection_takes_a_prune(sm, tmp_path)


def _background_collection_takes_a_prune(sm, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(f"file {i}\n".encode() * 100)
    sm.import_tree(src, "s")
    time.sleep(0.5)  # the collector thread, idle: nothing is pending
    assert _objects(sm) and not sm.collection_pending()
    sm.prune("s")
    deadline = time.monotonic() + 30
    while _objects(sm) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _objects(sm) == set()
    while sm.collection_pending() and time.monotonic() < deadline:
        time.sleep(0.1)  # the cycle records itself after its sweep
    assert not sm.collection_pending()
