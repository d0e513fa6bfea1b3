"""The write-ahead log on its own: durability order, torn tails, checkpoints."""

from __future__ import annotations

import json
import threading
import zlib

from hypothesis import given
from hypothesis import strategies as st

from cascowfs.wal import WriteAheadLog
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


def test_checkpoint_forgets_everything(tmp_path):
    wal = WriteAheadLog(tmp_path / "log")
    wal.prepare("branch", name="b")
    wal.checkpoint()
    assert wal.pending() == []
    assert (tmp_path / "log").stat().st_size == 0
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
