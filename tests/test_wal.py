"""The write-ahead log on its own: durability order, torn tails, checkpoints."""

from __future__ import annotations

import json
import os
import threading
import zlib

from hypothesis import given
from hypothesis import strategies as st

from cascowfs.wal import PREALLOCATED, WriteAheadLog
from conftest import hypothesis_settings


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


def test_checkpoint_forgets_everything_and_keeps_the_file_to_overwrite(tmp_path):
    path = tmp_path / "log"
    wal = WriteAheadLog(path)
    wal.prepare("branch", name="b")
    wal.checkpoint()
    assert wal.pending() == []
    assert path.read_bytes() == bytes(PREALLOCATED)
    blocks = os.stat(path).st_blocks
    after = wal.prepare("commit", name="b", id="s1")
    assert [p.op for p in wal.pending()] == [after]
    assert (path.stat().st_size, path.stat().st_blocks) == (PREALLOCATED, blocks), \
        "a record after a checkpoint overwrites the file, never grows it"
    wal.close()
    assert [p.op for p in WriteAheadLog(path).pending()] == [after]
    assert path.stat().st_size == len(path.read_bytes().rstrip(b"\0")), "close trims the zeros"


def test_a_log_outgrowing_its_file_grows_it_and_keeps_the_size(tmp_path):
    path = tmp_path / "log"
    wal = WriteAheadLog(path)
    wal.checkpoint()
    ops = [wal.prepare("label", durable=False, id="s", labels={"k": "v" * 4000})
           for _ in range(PREALLOCATED // 4000 + 10)]
    grown = path.stat().st_size
    assert grown > PREALLOCATED and [p.op for p in wal.pending()] == ops
    wal.checkpoint()
    last = wal.prepare("prune", id="x")
    assert path.stat().st_size == grown and [p.op for p in wal.pending()] == [last]
    wal.close()


def test_stale_records_never_follow_new_ones(tmp_path):
    """Records written after a checkpoint are shorter than those it forgot; a crash
    (the log reopened without close) must not bring the old ones back behind them."""
    path = tmp_path / "log"
    wal = WriteAheadLog(path)
    wal.checkpoint()
    for i in range(50):
        wal.finalize(wal.prepare("commit", name=f"b{i}", id=f"s{i}" * 20))
    wal.checkpoint()
    short = wal.prepare("prune", id="x")
    assert [p.op for p in WriteAheadLog(path).pending()] == [short]


def test_a_checkpoint_cut_after_its_first_sector_leaves_no_record(tmp_path):
    """A checkpoint zeroes and flushes the first sector before the rest: a power cut between
    the two shows an empty log, never a prefix that could redo an older label."""
    path = tmp_path / "log"
    wal = WriteAheadLog(path)
    for i in range(30):
        wal.prepare("label", durable=False, id="s", labels={"n": str(i)})
    wal.close()
    with open(path, "r+b") as fh:
        fh.write(bytes(512))
    assert WriteAheadLog(path).pending() == []


def test_a_torn_record_and_what_follows_it_are_zeroed_at_open(tmp_path):
    path = tmp_path / "log"
    wal = WriteAheadLog(path)
    first = wal.prepare("prune", id="x")
    wal.close()
    body = b'{"op":"ghost","step":"prepare","kind":"prune","args":{}}'
    with open(path, "ab") as fh:
        fh.write(b"1a2b")  # torn: a record cut short
        fh.write(f"{zlib.crc32(body):08x} ".encode() + body + b"\n")  # whole, never acked
    kept = path.read_bytes().index(b"\n") + 1
    wal = WriteAheadLog(path)
    assert path.read_bytes()[kept:].strip(b"\0") == b"", "what follows the torn record is zeroed"
    second = wal.prepare("discard", name="c")
    assert [p.op for p in wal.pending()] == [first, second]
    wal.close()


def test_records_of_concurrent_operations_stay_whole_and_in_the_log(tmp_path):
    """Flushes run outside the append lock (group commit): records that threads append while
    others flush, durable or not, each stay one whole line, and replay sees exactly the
    operations left unfinished."""
    path = tmp_path / "log"
    wal = WriteAheadLog(path)
    unfinished: list[list[str]] = [[] for _ in range(8)]

    def operations(worker: int) -> None:
        for i in range(60):
            op = wal.prepare("label" if i % 2 else "commit", durable=i % 2 == 0, n=f"{worker}.{i}")
            if i % 3:
                wal.finalize(op)
            else:
                unfinished[worker].append(op)
            if i % 10 == 0:
                wal.sync()

    workers = [threading.Thread(target=operations, args=(w,)) for w in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wal.close()
    expected = {op for ops in unfinished for op in ops}
    assert {p.op for p in WriteAheadLog(path).pending()} == expected
    assert len(path.read_bytes().splitlines()) == 8 * 60 + 8 * 40  # every record, none torn


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _line(record) -> bytes:
    body = json.dumps(record).encode()
    return f"{zlib.crc32(body):08x} ".encode() + body + b"\n"


@hypothesis_settings(200)
@given(odd=st.lists(st.dictionaries(st.sampled_from(["op", "step", "kind", "args"]), json_values),
                    max_size=6))
def test_whole_records_of_any_shape_never_break_replay(tmp_path_factory, odd):
    """A line whose CRC holds is whole, not necessarily one of ours (a hand edit, another
    version's): replay skips what it cannot read and keeps the records around it."""
    path = tmp_path_factory.mktemp("wal") / "log"
    wal = WriteAheadLog(path)
    first = wal.prepare("prune", id="x")
    wal.close()
    with open(path, "ab") as fh:
        fh.writelines(_line(rec) for rec in odd)
        deep = b"[" * 100_000
        fh.write(_line("not an object") + _line([[[]]]) + f"{zlib.crc32(deep):08x} ".encode()
                 + deep + b"\n")
    wal = WriteAheadLog(path)
    last = wal.prepare("label", id="y", labels={"k": "v"})
    pending = wal.pending()
    wal.close()
    assert [pending[0].op, pending[-1].op] == [first, last]
    for op in pending:
        assert isinstance(op.op, str) and isinstance(op.kind, str) and isinstance(op.args, dict)


def test_a_read_only_log_neither_zeroes_its_torn_tail_nor_trims_its_zeros(tmp_path):
    path = tmp_path / "log"
    wal = WriteAheadLog(path)
    first = wal.prepare("prune", id="x")
    wal.close()
    left = path.read_bytes() + b"1a2b torn" + bytes(PREALLOCATED)
    path.write_bytes(left)
    wal = WriteAheadLog(path, read_only=True)
    assert [p.op for p in wal.pending()] == [first]
    wal.close()
    assert path.read_bytes() == left
