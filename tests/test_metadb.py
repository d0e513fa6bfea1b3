"""cascowfs/metadb.py: the LMDB environment, its named databases, and group commit on one
committer thread (each caller's changes undone alone when its function raises)."""

from __future__ import annotations

import threading

import lmdb
import pytest

from conftest import run_child
from cascowfs.errors import StoreIOError
from cascowfs.metadb import DB_NAMES, LEGACY_DB_NAMES, MetaDB


def _get(meta: MetaDB, name: str, key: bytes) -> bytes | None:
    with meta.read() as txn:
        return txn.get(key, db=meta.db(name))


def test_every_named_database_is_there_and_separate(db):
    names = [n.decode() for n in DB_NAMES]
    db.write(lambda txn: [txn.put(b"k", n.encode(), db=db.db(n)) for n in names])
    assert [_get(db, n, b"k") for n in names] == [n.encode() for n in names]


def test_a_write_returns_its_result_and_survives_a_reopen(tmp_path):
    meta = MetaDB(tmp_path / "meta")
    try:
        assert meta.write(lambda txn: txn.put(b"id", b"value", db=meta.db("snapshots"))) is True
    finally:
        meta.close()
    meta = MetaDB(tmp_path / "meta")
    try:
        assert _get(meta, "snapshots", b"id") == b"value"
    finally:
        meta.close()


def test_a_raising_function_leaves_nothing_and_its_error_reaches_the_caller(db):
    def half_then_fail(txn):
        txn.put(b"half", b"x", db=db.db("meta"))
        raise KeyError("refused")

    with pytest.raises(KeyError, match="refused"):
        db.write(half_then_fail)
    assert _get(db, "meta", b"half") is None


def test_a_dry_run_returns_the_result_and_changes_nothing(db):
    def put_and_count(txn):
        txn.put(b"k", b"v", db=db.db("branches"))
        return txn.stat(db.db("branches"))["entries"]

    assert db.write(put_and_count, dry_run=True) == 1
    assert _get(db, "branches", b"k") is None


def test_concurrent_writers_each_commit_or_fail_alone(db):
    """Many threads write at once (their functions share outer transactions): the ones that
    raise lose their own changes only."""
    errors: dict[int, BaseException] = {}

    def writer(i: int) -> None:
        def fn(txn):
            txn.put(b"%03d" % i, b"x", db=db.db("objects"))
            if i % 3 == 0:
                raise ValueError(i)
            return i
        try:
            assert db.write(fn, f"writer {i}") == i
        except ValueError as exc:
            errors[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(errors) == list(range(0, 60, 3))
    with db.read() as txn:
        stored = sorted(int(k) for k, _ in txn.cursor(db=db.db("objects")))
    assert stored == [i for i in range(60) if i % 3]


def test_a_closed_store_refuses_writes_by_name(tmp_path):
    meta = MetaDB(tmp_path / "meta")
    meta.close()
    with pytest.raises(StoreIOError, match="committing x: the store is closed"):
        meta.write(lambda txn: None, "committing x")


def test_legacy_databases_are_dropped_if_there(db):
    db.write(db.drop_legacy)  # none there: nothing to do
    for name in LEGACY_DB_NAMES:
        handle = db.env.open_db(name)
        db.write(lambda txn, h=handle: txn.put(b"k", b"v", db=h))
    db.write(db.drop_legacy)
    with db.env.begin() as txn:
        for name in LEGACY_DB_NAMES:
            with pytest.raises(lmdb.NotFoundError):
                db.env.open_db(name, txn=txn, create=False)


# The collector's marking child: another process, reading while the daemon holds the store.
READER = """
import sys, lmdb
from cascowfs.metadb import open_reader
env, dbs = open_reader(sys.argv[1])
print(" ".join(sorted(dbs)))
with env.begin() as txn:
    print(txn.get(b"s1", db=dbs["snapshots"]).decode())
try:
    with env.begin(write=True) as txn:
        txn.put(b"s2", b"{}", db=dbs["snapshots"])
    print("wrote")
except lmdb.ReadonlyError:
    print("read-only")
"""


def test_another_process_reads_what_the_writer_committed_and_cannot_write(db):
    db.write(lambda txn: txn.put(b"s1", b"{}", db=db.db("snapshots")))
    proc = run_child(READER, str(db.path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [" ".join(sorted(n.decode() for n in DB_NAMES)), "{}",
                                        "read-only"]
    assert _get(db, "snapshots", b"s2") is None


def test_submitted_writes_commit_in_queue_order_and_report_after_their_commit(db):
    """``submit`` returns before the commit: each request's ``on_done`` runs once its batch
    committed (a reader sees its change there), before ``wait`` returns, in queue order."""
    release = threading.Event()
    seen: list[tuple[int, bytes | None]] = []

    def stall(txn):
        release.wait()

    def put(i: int):
        def fn(txn):
            txn.put(b"k", b"%d" % i, db=db.db("meta"))
            if i == 2:
                raise ValueError(i)
            return i
        return fn

    stalled = db.submit(stall, "stalling")
    requests = [
        db.submit(put(i), f"put {i}", on_done=lambda r, i=i: seen.append((i, _get(db, "meta", b"k"))))
        for i in range(5)
    ]
    assert not any(r.done.is_set() for r in requests)  # the committer is still in ``stall``
    assert _get(db, "meta", b"k") is None
    release.set()
    assert [r.wait() for r in requests if r is not requests[2]] == [0, 1, 3, 4]
    with pytest.raises(ValueError):
        requests[2].wait()
    stalled.wait()
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert all(value == b"4" for _, value in seen)  # one batch: seen after it committed


def test_a_raising_on_done_does_not_keep_waiters_waiting(db):
    def explode(request):
        raise RuntimeError("on_done")

    assert db.submit(lambda txn: 7, "seven", on_done=explode).wait() == 7


@pytest.mark.parametrize("damage", ["cut", "zeroed metas", "one meta zeroed"])
def test_a_damaged_data_file_is_named_not_a_crash(tmp_path, damage):
    """LMDB maps data.mdb without checking its length: a page read past a cut end would
    kill the process with SIGBUS. The file is checked against its meta pages first."""
    db = MetaDB(tmp_path / "meta")
    for n in range(200):
        db.write(lambda txn, n=n: txn.put(b"k%d" % n, b"v" * 3000, db=db.db("meta")))
    db.close()
    data = tmp_path / "meta" / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        if damage == "cut":
            f.truncate(size // 2)
        else:
            f.write(bytes(4096 * (2 if damage == "zeroed metas" else 1)))
    code = ("from pathlib import Path; from cascowfs.metadb import MetaDB\n"
            "from cascowfs.errors import StoreIOError\n"
            f"try:\n    db = MetaDB(Path({str(tmp_path / 'meta')!r}))\n"
            "except StoreIOError as exc:\n    print('refused:', exc.message)\n"
            "else:\n    with db.read() as txn:\n"
            "        print('read', sum(1 for _ in txn.cursor(db=db.db('meta'))))\n")
    proc = run_child(code)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    if damage == "one meta zeroed":  # LMDB refuses the file, or reads it by the other meta
        assert proc.stdout.startswith(("refused: opening the metadata", "read")), proc.stdout
    else:
        want = "cut short" if damage == "cut" else "no LMDB meta page"
        assert proc.stdout.startswith("refused:") and want in proc.stdout, proc.stdout
