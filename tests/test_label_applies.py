"""Labels are acknowledged once their WAL record is flushed and applied to LMDB behind
(``cascowfs/label_applies.py``): every reader sees a label that returned, concurrent labels of
one snapshot compose in order, a label racing a prune lands before it or fails with ENOENT,
an acknowledged label survives kill -9 and a close, and a log record of any shape replays
without breaking the open."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_fsck_clean, hypothesis_settings, open_store
from support.processes import REPO, child_env, read_first_line
from cascowfs.episodes import FindQuery, Predicate, parse_predicate
from cascowfs.errors import BusyError, NoSpaceError, NotFoundError
from cascowfs.label_applies import redo
from cascowfs.state import StateManager
from cascowfs.wal import PendingOp

pytestmark = pytest.mark.engine


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "f").write_text("x\n")
    return src


@contextmanager
def stalled_committer(sm: StateManager) -> Iterator[Callable[[], None]]:
    """Hold LMDB's committer inside a transaction of its own until the yielded function is
    called: every write queued meanwhile waits for it, reads go on."""
    release, entered = threading.Event(), threading.Event()

    def stall(txn) -> None:
        entered.set()
        release.wait()

    stalled = sm.db.submit(stall, "stalling the committer")
    entered.wait()
    try:
        yield release.set
    finally:
        release.set()
        stalled.wait()


def recorded_labels(sm: StateManager, id: str) -> dict[str, str]:
    """What LMDB itself holds, past the labels not applied yet."""
    with sm.db.read() as txn:
        return sm.catalog.snapshot(txn, id).labels


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_label_returns_before_lmdb_has_it_and_every_reader_sees_it(sm, tmp_path):
    sm.import_tree(_source(tmp_path), "s", {"keep": "1", "gone": "x"})
    with stalled_committer(sm) as release:
        assert sm.label("s", {"reward": "0.75", "gone": ""}) == {"keep": "1", "reward": "0.75"}
        assert recorded_labels(sm, "s") == {"keep": "1", "gone": "x"}  # not applied yet
        wanted = {"keep": "1", "reward": "0.75"}
        assert sm.snapshot("s").labels == wanted
        assert [info.labels for info in sm.snapshots()] == [wanted]
        assert [episode.labels for episode in sm.episodes()] == [wanted]
        finder, found = in_thread(lambda: sm.find(FindQuery((parse_predicate("reward>0.5"),))))
        release()
        finder.join()
    assert found == {"result": ["s"]}
    assert recorded_labels(sm, "s") == wanted


def test_no_reader_sees_a_label_before_its_record_is_durable(sm, tmp_path):
    sm.import_tree(_source(tmp_path), "s", {"v": "0"})
    with sm.wal._flush_lock:  # the label's flush waits here, its record written
        labeller, labelled = in_thread(lambda: sm.label("s", {"v": "1"}))
        while not any(op.kind == "label" for op in sm.wal.pending()):
            labeller.join(0.01)
        assert sm.snapshot("s").labels == {"v": "0"}
        assert [episode.labels for episode in sm.episodes()] == [{"v": "0"}]
    labeller.join()
    assert labelled == {"result": {"v": "1"}} and sm.snapshot("s").labels == {"v": "1"}


def test_labels_of_one_snapshot_from_many_threads_compose_in_order(sm, tmp_path):
    """Four agents back-propagate through the same node beside commits: every key each one
    set is kept, and the node ends with the labels of the last label taken."""
    sm.import_tree(_source(tmp_path), "node")
    tree = sm.create_branch("b", "node").tree
    returned: list[dict[str, str]] = []

    def agent(n: int) -> None:
        for step in range(25):
            returned.append(sm.label("node", {f"visits{n}": str(step), "last": f"{n}.{step}"}))

    def committer() -> None:
        for step in range(5):
            (tree / "f").write_text(f"{step}\n")
            sm.commit("b", f"c{step}")

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=committer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = {**{f"visits{n}": "24" for n in range(4)}}
    [last] = [labels for labels in returned if all(labels[k] == v for k, v in final.items())]
    assert sm.snapshot("node").labels == last
    sm.label_applies.wait_applied()
    assert recorded_labels(sm, "node") == last


@hypothesis_settings(30)
@given(steps=st.lists(st.dictionaries(st.sampled_from("abcd"), st.sampled_from(["", "1", "2.5", "x"]),
                                      min_size=1), min_size=1, max_size=8))
def test_labels_queued_behind_a_stalled_store_end_as_applied_in_order(tmp_path_factory, steps):
    tmp_path = tmp_path_factory.mktemp("labels")
    with open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "s")
        model: dict[str, str] = {}
        with stalled_committer(sm):
            for changes in steps:
                model = {k: v for k, v in {**model, **changes}.items() if v}
                assert sm.label("s", changes) == model
                assert sm.snapshot("s").labels == model
        assert sm.find(FindQuery((Predicate("a"),))) == (["s"] if "a" in model else [])
        assert sm.find(FindQuery((parse_predicate("b=2.5"),))) == (
            ["s"] if model.get("b") == "2.5" else [])
        assert recorded_labels(sm, "s") == model
    with open_store(tmp_path / "store") as sm:
        assert sm.snapshot("s").labels == model


def test_a_label_racing_a_prune_lands_before_it_or_fails_with_enoent(sm, tmp_path, caplog):
    sm.import_tree(_source(tmp_path), "p")
    with stalled_committer(sm) as release:
        assert sm.label("p", {"v": "1"}) == {"v": "1"}
        pruner, pruned = in_thread(lambda: sm.prune("p"))
        labeller, labelled = in_thread(lambda: sm.label("p", {"v": "2"}))
        release()
        pruner.join()
        labeller.join()
    assert pruned == {"result": None}
    assert labelled.get("result") == {"v": "2"} or isinstance(labelled.get("error"), NotFoundError)
    with pytest.raises(NotFoundError):
        sm.label("p", {"v": "3"})
    with caplog.at_level(logging.WARNING, logger="cascowfs.labels"):
        sm.label_applies.wait_applied()
    assert "labels are dropped" not in caplog.text and not sm.label_applies.failed


def test_a_prune_that_fails_lets_the_labels_waiting_for_it_go_on(sm, tmp_path):
    sm.import_tree(_source(tmp_path), "base")
    sm.create_branch("b", "base")
    with pytest.raises(BusyError):
        sm.prune("base")
    assert sm.label("base", {"k": "v"}) == {"k": "v"}


def test_close_waits_for_the_labels_in_flight(tmp_path):
    store = tmp_path / "store"
    with open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "s")
        for n in range(50):
            sm.label("s", {"n": str(n), f"k{n % 7}": str(n)})
    sm = StateManager.open(store, recover=False)  # as left: nothing replayed
    try:
        assert sm.wal.pending() == []
        assert recorded_labels(sm, "s")["n"] == "49"
    finally:
        sm.close()


LABELLER = r"""
import sys, threading
from cascowfs.state import StateManager
from cascowfs.tuning import Tuning
sm = StateManager.open(sys.argv[1], tuning=Tuning(checkpoint_every=7))
tree = sm.create_branch("b", "s").tree
def commits():
    n = 0
    while True:
        n += 1
        (tree / "f").write_text(f"{n}\n")
        sm.commit("b")
threading.Thread(target=commits, daemon=True).start()
print("open", flush=True)
n = 0
while True:
    n += 1
    sm.label("s", {"n": str(n), "sq": str(n * n)})
    print(n, flush=True)
"""


def test_every_label_acknowledged_before_a_kill_9_survives_it(tmp_path):
    """A child labels as fast as it can beside commits, printing each label that returned,
    with WAL checkpoints between them; kill -9 after some: the last one printed (or a later
    one, which the log may hold too) is what the store holds after the next open."""
    store = tmp_path / "store"
    with open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "s")
    proc = subprocess.Popen([sys.executable, "-c", LABELLER, str(store)], cwd=REPO,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert read_first_line(proc).strip() == "open", proc.stderr.read() if proc.stderr else ""
        acknowledged = 0
        while acknowledged < 60:
            line = read_first_line(proc)
            assert line, "the child stopped labelling"
            acknowledged = int(line)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and b"Traceback" not in err, err.decode()
    try:
        StateManager.open(store).close()  # recovery, leaving the child's branch mounted
        assert_fsck_clean(store, deep=False)
    finally:
        with open_store(store) as sm:
            labels = sm.snapshot("s").labels
    assert int(labels["n"]) >= acknowledged and labels["sq"] == str(int(labels["n"]) ** 2)


def _append(store: Path, *records: object) -> None:
    with open(store / "wal" / "log", "ab") as fh:
        for rec in records:
            body = json.dumps(rec).encode()
            fh.write(f"{zlib.crc32(body):08x} ".encode() + body + b"\n")


def test_label_records_of_odd_shapes_are_skipped_at_open(tmp_path, caplog):
    store = tmp_path / "store"
    with open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "s", {"was": "1"})
    odd = [
        {"id": "s"},  # an older version's record: keys, no labels
        {"id": "s", "labels": ["a", "b"]},
        {"id": ["s"], "labels": {"a": "1"}},
        {"id": "s", "labels": {"a": 1}},
        {"id": "s", "labels": {"a": "v" * 5000}},
        {"id": "s", "labels": {f"k{i}": "v" for i in range(200)}},
        {"id": "s", "labels": {"bad key": "1"}},
        {"id": "../s", "labels": {"a": "1"}},
        {"id": "nope", "labels": {"a": "1"}},  # a snapshot pruned after the label
    ]
    _append(store, *({"op": f"odd{i}", "step": "prepare", "kind": "label", "args": args}
                     for i, args in enumerate(odd)),
            {"op": "good", "step": "prepare", "kind": "label",
             "args": {"id": "s", "labels": {"now": "2"}}},
            {"op": ["x"], "step": "prepare", "kind": "label", "args": {}},
            {"op": "y", "step": "prepare", "kind": "label", "args": "s"})
    with caplog.at_level(logging.WARNING, logger="cascowfs.labels"):
        with open_store(store) as sm:
            assert sm.snapshot("s").labels == {"now": "2"}
            assert sm.wal.pending() == []
    assert caplog.text.count("not redone") == len(odd) - 1
    assert "snapshot nope is gone" in caplog.text


@hypothesis_settings(300)
@given(args=st.dictionaries(
    st.sampled_from(["id", "labels", "keys"]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)))
def test_redo_of_a_label_record_of_any_shape_never_raises(tmp_path_factory, args):
    from cascowfs.catalog import Catalog
    from cascowfs.metadb import MetaDB

    db = MetaDB(tmp_path_factory.mktemp("meta") / "meta")
    try:
        redo(db, Catalog(db.dbs), PendingOp("op1", "label", args))
    finally:
        db.close()


def test_a_label_whose_transaction_failed_is_kept_by_the_later_labels(tmp_path, monkeypatch):
    """A label's LMDB transaction fails (a full disk); later labels of the snapshot are
    acknowledged and commit. Every one of them holds: live, and after a reopen, which used
    to redo the failed label's older set over the newer ones."""
    import cascowfs.label_applies as label_applies

    store = tmp_path / "store"
    real = label_applies.apply_label
    fails = iter([True])

    def failing_once(catalog, txn, op, id, labels):
        if next(fails, False):
            raise NoSpaceError("store disk is full (injected)")
        return real(catalog, txn, op, id, labels)

    with open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "s")
        monkeypatch.setattr(label_applies, "apply_label", failing_once)
        sm.label("s", {"a": "1", "visits": "1"})
        sm.label("s", {"visits": "2"})
        sm.label("s", {"b": "3"})
        sm.label_applies.wait_applied()
        monkeypatch.setattr(label_applies, "apply_label", real)
        want = {"a": "1", "visits": "2", "b": "3"}
        assert sm.snapshot("s").labels == want
        assert recorded_labels(sm, "s") == want
        assert sm.wal.pending() == []  # the failed one is applied by the later ones
    assert_fsck_clean(store)
    with open_store(store) as sm:
        assert sm.snapshot("s").labels == want


def test_replay_applies_a_snapshots_last_label_record_not_an_older_one(tmp_path):
    """A failed label's record left open in the log (its FINALIZE lost) while a later label
    of its snapshot committed: the next open must not roll the snapshot back to it."""
    store = tmp_path / "store"
    with open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "s", {"visits": "1"})
        sm.wal.prepare("label", id="s", labels={"visits": "2"})  # never applied
        sm.label("s", {"visits": "3"})
        sm.label_applies.wait_applied()
        assert [op.kind for op in sm.wal.pending()] == ["label"]
    with open_store(store) as sm:
        assert sm.snapshot("s").labels == {"visits": "3"}
        assert sm.wal.pending() == []


def test_a_failed_label_keeps_what_readers_see_until_a_later_one_lands(tmp_path, monkeypatch):
    """The label acknowledged stays visible, and the next label composes on it."""
    import cascowfs.label_applies as label_applies

    real = label_applies.apply_label

    def failing(catalog, txn, op, id, labels):
        raise NoSpaceError("store disk is full (injected)")

    with open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "s")
        monkeypatch.setattr(label_applies, "apply_label", failing)
        sm.label("s", {"a": "1"})
        sm.label_applies.wait_applied()
        assert sm.snapshot("s").labels == {"a": "1"}
        assert sm.label_applies.failed
        monkeypatch.setattr(label_applies, "apply_label", real)
        assert sm.label("s", {"b": "2"}) == {"a": "1", "b": "2"}
        sm.label_applies.wait_applied()
        assert recorded_labels(sm, "s") == {"a": "1", "b": "2"}
        assert not sm.label_applies.failed
        sm.prune("s")


def _flush_and_transaction_fail(monkeypatch, sm: StateManager, bad: dict[str, str]) -> None:
    """The next label whose set holds ``bad`` fails twice: the flush of its record (EIO) and
    its LMDB transaction. The flush works again once the label has failed."""
    import cascowfs.label_applies as label_applies
    from cascowfs.errors import StoreIOError

    real_apply, real_sync = label_applies.apply_label, sm.wal._sync_data

    def failing_apply(catalog, txn, op, id, labels):
        if bad.items() <= labels.items():
            raise StoreIOError("store disk failed (injected)")
        return real_apply(catalog, txn, op, id, labels)

    def failing_sync():
        raise StoreIOError("syncing the write-ahead log: EIO (injected)")

    monkeypatch.setattr(label_applies, "apply_label", failing_apply)
    monkeypatch.setattr(sm.wal, "_sync_data", failing_sync)
    with pytest.raises(StoreIOError, match="syncing the write-ahead log"):
        sm.label("s", bad)
    monkeypatch.setattr(sm.wal, "_sync_data", real_sync)
    monkeypatch.setattr(label_applies, "apply_label", real_apply)


def test_a_label_whose_flush_and_transaction_failed_keeps_no_checkpoint_away(
    tmp_path, monkeypatch
):
    """A label failed to its caller (its record unflushed, its transaction failed) is not
    one the log must keep: it used to stay among the failed labels for the rest of the run,
    and every checkpoint was skipped."""
    with open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "s")
        _flush_and_transaction_fail(monkeypatch, sm, {"bad": "1"})
        assert sm.label("s", {"ok": "1"}) == {"ok": "1"}
        sm.label_applies.wait_applied()
        assert not sm.label_applies.failed
        sm.checkpoint()
        assert sm.wal.pending() == [] and sm.wal.records_since_checkpoint == 0
        assert sm.snapshot("s").labels == {"ok": "1"}


def test_a_label_failed_to_its_caller_is_not_applied_by_the_next_open(tmp_path, monkeypatch):
    """Its record stays in the log (only the flush failed) and the store closes without a
    checkpoint: the next open must not apply what its caller was told had failed."""
    store = tmp_path / "store"
    with open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "s", {"visits": "1"})
        _flush_and_transaction_fail(monkeypatch, sm, {"bad": "1"})
        assert sm.snapshot("s").labels == {"visits": "1"}
    with open_store(store) as sm:
        assert sm.snapshot("s").labels == {"visits": "1"}
        assert sm.wal.pending() == []
    assert_fsck_clean(store)


def test_replay_of_a_failed_label_skips_a_later_one_failed_to_its_caller(tmp_path, monkeypatch):
    """Label A is acknowledged but its transaction fails; label B of the same snapshot, built
    on A, fails to its caller. Replay redoes A from the last label record of the snapshot,
    which must be A's own, not B's."""
    import cascowfs.label_applies as label_applies

    store = tmp_path / "store"
    real = label_applies.apply_label

    def failing(catalog, txn, op, id, labels):
        raise NoSpaceError("store disk is full (injected)")

    with open_store(store) as sm:
        sm.import_tree(_source(tmp_path), "s")
        monkeypatch.setattr(label_applies, "apply_label", failing)
        assert sm.label("s", {"a": "1"}) == {"a": "1"}  # acknowledged
        sm.label_applies.wait_applied()
        _flush_and_transaction_fail(monkeypatch, sm, {"b": "2"})
        assert sm.snapshot("s").labels == {"a": "1"}
        monkeypatch.setattr(label_applies, "apply_label", real)
    with open_store(store) as sm:
        assert sm.snapshot("s").labels == {"a": "1"}
        assert sm.wal.pending() == []
    assert_fsck_clean(store)
