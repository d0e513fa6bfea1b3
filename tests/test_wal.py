"""The write-ahead log on its own: durability order, torn tails, checkpoints."""

from __future__ import annotations

from cascowfs.wal import WriteAheadLog


def test_pending_lists_prepared_but_unfinalized_ops(tmp_path):
    wal = WriteAheadLog(tmp_path / "wal" / "log")
    a = wal.prepare("commit", name="b", id="s1")
    b = wal.prepare("discard", name="c")
    wal.finalize(a)
    pending = wal.pending()
    assert [(p.op, p.kind, p.args) for p in pending] == [(b, "discard", {"name": "c"})]
    wal.close()


def test_torn_tail_is_ignored_and_nothing_after_it_counts(tmp_path):
    path = tmp_path / "log"
    wal = WriteAheadLog(path)
    a = wal.prepare("prune", id="x")
    wal.close()
    with open(path, "ab") as fh:
        fh.write(b'deadbeef {"op":"zz","step":"prepare","kind":"prune"}\n')  # bad checksum
        fh.write(b"0000")  # torn, no newline
    assert [p.op for p in WriteAheadLog(path).pending()] == [a]


def test_checkpoint_forgets_everything(tmp_path):
    wal = WriteAheadLog(tmp_path / "log")
    wal.prepare("branch", name="b")
    wal.checkpoint()
    assert wal.pending() == []
    assert (tmp_path / "log").stat().st_size == 0
    wal.close()
