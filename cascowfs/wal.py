"""Write-ahead log: the intent of every multi-step operation, durable before its side effects.

One record per line: ``<crc32 hex> <json>``. A PREPARE record is fsync'd before the operation
touches anything; FINALIZE is appended without fsync (losing it only makes replay re-check an
operation that already finished, and every recovery step is idempotent). Whether an operation
got past APPLY is not kept here but in LMDB itself, in the same transaction as the change
(the ``ops`` database), so "applied" can never disagree with the state it describes. A
label is the exception: its record carries its whole result, and replay redoes it from there
(``label_applies.py``).

Appends and flushes take different locks (group commit). A flush of the growing log costs
the ext4 journal commit it forces, about 10 ms on a busy disk; held under the append lock,
it would make every record behind it wait, the unflushed ones too (every FINALIZE): a
label's two appends beside two threads flushing took 9.9 ms at P95 that way,
0.1 ms this way. A record is written under the append lock, and a durable one then waits for
a flush that started after its write: one ``fdatasync`` makes every record written before it
durable, so operations preparing at the same time share it.

The log is overwritten in place, not appended to. Growing a file makes ``fdatasync`` commit
the ext4 journal for the new size, and under a busy disk that commit queues behind every other
writer's metadata: the daemon's profiles of the 4-agent mix put most of a label's time there.
Overwriting blocks the file already has flushes their data alone. So a checkpoint leaves the
file at its size, zero-filled (at least ``PREALLOCATED`` bytes), and records are written from
offset 0 again; a record that runs past the end appends, and the file keeps the size it grew
to. Bytes past the log's end are always zero: a checkpoint zeroes the records it forgets, and a
write that failed halfway is zeroed again, so a stale record can never follow a new one.

Replay reads every whole line (its CRC holds) and skips one that is not a record of the shape
it reads (a hand edit, another program's line); a torn line ends the log, and so does the first
zero byte.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .durability import fsync_dir
from .errors import from_os_error

log = logging.getLogger("cascowfs.wal")

PREALLOCATED = 1 << 20  # bytes a checkpoint leaves zero-filled for records to overwrite
_SECTOR = 512  # the unit a disk writes whole


@dataclass
class PendingOp:
    op: str
    kind: str
    args: dict = field(default_factory=dict)
    finished: bool = False  # its FINALIZE is in the log too
    abandoned: bool = False  # finalized as never acknowledged: nothing may replay its record


def new_op_id() -> str:
    return secrets.token_hex(5)


class WriteAheadLog:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """``read_only``: a look at the log as it was left (fsck of a stopped store), which
        neither zeroes a torn tail nor trims the file at close."""
        self.path = path
        self._read_only = read_only
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = threading.Lock()  # operations on different branches append concurrently
        self._flush_lock = threading.Lock()  # one fdatasync at a time, outside ``_lock``
        self._written = 0  # bytes appended since open (checkpoints included): flush targets
        self._flushed = 0  # of those, how many an fdatasync has made durable
        if created:
            fsync_dir(path.parent)
        self._end, self._size = self._find_end()  # where the next record goes; the file's size
        self.records_since_checkpoint = 0
        self.last_kind: str | None = None  # the latest operation logged (systemd's STATUS=)
        self.replayed = 0  # unfinished operations recovery found at open (the metrics')

    def _find_end(self) -> tuple[int, int]:
        """The end of the log's whole records, and the file's size. Whatever lies between
        them (a torn record, records behind it) was never acknowledged: zeroed now, so that
        a record written there can never be followed by one of them."""
        with open(self.path, "rb") as fh:
            data = fh.read()
        end = max((stop for _, stop in _whole_records(data)), default=0)
        dirty = len(data.rstrip(b"\0"))
        if dirty > end and not self._read_only:
            self._zero(end, dirty)
            self._sync_data()
        return end, len(data)

    def _append(self, record: dict, durable: bool) -> int:
        """Write ``record``; returns the flush target that covers it (``flush_through``)."""
        body = json.dumps(record, separators=(",", ":"), sort_keys=True)
        line = f"{zlib.crc32(body.encode()):08x} {body}\n".encode()
        with self._lock:
            written = self._write_locked(line)
        if durable:
            self.flush_through(written)
        return written

    def _write_locked(self, line: bytes) -> int:
        """Write ``line`` at the log's end; returns ``_written`` after it, the flush target
        that covers it."""
        start = self._end
        try:
            if os.pwrite(self._fd, line, start) != len(line):
                raise OSError(errno.ENOSPC, "short write to the write-ahead log")
        except OSError as exc:
            # A torn record would hide every later one from replay: zero it again.
            try:
                self._zero(start, start + len(line))
            except OSError:
                pass
            raise from_os_error(exc, "writing the write-ahead log") from exc
        self._end += len(line)
        self._size = max(self._size, self._end)
        self.records_since_checkpoint += 1
        self._written += len(line)
        return self._written

    def _zero(self, start: int, stop: int) -> None:
        """Overwrite bytes ``start``..``stop`` of the file with zeros, in pieces."""
        piece = bytes(max(0, min(stop - start, 1 << 20)))
        while start < stop:
            start += os.pwrite(self._fd, piece[: stop - start], start)

    def _sync_data(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise from_os_error(exc, "syncing the write-ahead log") from exc

    def flush_through(self, written: int) -> None:
        """Make the log durable at least up to ``written`` (a ``_written`` value). A record
        whose flush fails stays in the log, whole: replay finds its operation never applied."""
        with self._flush_lock:
            if self.flushed(written):
                return  # a flush that started after this record's write covered it
            target = self.flush_target()
            self._sync_data()
            self.note_flushed(target)

    # A caller that flushes the log its own way (the trio thread's labels, with a kernel
    # fdatasync of ``fileno()``) takes its target before, and notes it after.
    def flush_target(self) -> int:
        """How far a flush that starts now makes the log durable."""
        with self._lock:
            return self._written

    def flushed(self, written: int) -> bool:
        """Has a flush made the log durable up to ``written``?"""
        return self._flushed >= written

    def note_flushed(self, target: int) -> None:
        """A flush that started at ``flush_target() == target`` has returned."""
        with self._lock:
            self._flushed = max(self._flushed, target)

    def fileno(self) -> int:
        return self._fd

    def prepare(self, kind: str, *, durable: bool = True, **args) -> str:
        """Log an operation's intent. ``durable=False`` is for operations whose recovery the
        recorded state alone decides (see docs/architecture.md): their record is written but
        not flushed, saving one fdatasync on the hot path."""
        return self.log_prepare(kind, durable=durable, **args)[0]

    def log_prepare(self, kind: str, *, durable: bool, **args) -> tuple[str, int]:
        """``prepare``, returning also the flush target that covers the record: an operation
        that orders its records under a lock of its own writes them there with
        ``durable=False`` and flushes outside it (a label)."""
        op = new_op_id()
        written = self._append(
            {"op": op, "step": "prepare", "kind": kind, "args": args}, durable=durable
        )
        self.last_kind = kind
        return op, written

    def sync(self) -> None:
        """Make every record written so far durable (a ``durable=False`` PREPARE whose
        operation is about to leave something recovery must find)."""
        with self._lock:
            written = self._written
        self.flush_through(written)

    def finalize(self, op: str) -> None:
        self._append({"op": op, "step": "finalize"}, durable=False)

    def abandon(self, op: str) -> None:
        """FINALIZE an op that was never acknowledged and never applied (a label whose flush
        and transaction both failed): replay must neither redo it nor take its record for
        another op's (``label_applies.last_of_each_snapshot``). Older versions read the
        record as a plain FINALIZE."""
        self._append({"abandoned": True, "op": op, "step": "finalize"}, durable=False)

    def pending(self) -> list[PendingOp]:
        """Operations prepared but not finalized, in log order. A torn tail is ignored."""
        return [op for op in self.prepared() if not op.finished]

    def prepared(self) -> list[PendingOp]:
        """Every operation the log holds, finalized (``finished``) or not, in log order (a
        label's replay looks at the later labels of its snapshot)."""
        ops: dict[Any, PendingOp] = {}  # by op id, as the log spells it
        with open(self.path, "rb") as fh:
            data = fh.read()
        for rec, _ in _whole_records(data):
            if not _replayable(rec):
                continue  # whole, but of a shape replay cannot use: not an op of ours
            if rec.get("step") == "prepare":
                ops[rec["op"]] = PendingOp(rec["op"], rec["kind"], rec.get("args", {}))
            elif rec.get("step") == "finalize" and rec.get("op") in ops:
                ops[rec.get("op")].finished = True
                ops[rec.get("op")].abandoned = rec.get("abandoned") is True
        return list(ops.values())

    def checkpoint(self) -> None:
        """Forget everything: call only when no operation is pending.

        The first sector is zeroed and flushed before the rest (a sector is written whole):
        until every block of the zeroing is on disk, replay must see no record, not some
        prefix of them, which could end before a later label of a snapshot and redo an
        older one."""
        with self._lock:
            if self._end:
                self._zero(0, min(self._end, _SECTOR))
                self._sync_data()
                self._zero(_SECTOR, self._end)
            if self._size < PREALLOCATED:  # a new log, or one trimmed by close()
                try:
                    self._zero(self._size, PREALLOCATED)
                    self._size = PREALLOCATED
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    # A full disk must not keep the store from opening (freeing space needs
                    # it open): records extend the log as they are written, and the next
                    # checkpoint tries again.
                    self._size = os.fstat(self._fd).st_size
                    log.warning("%s: no room to preallocate the log (%s)", self.path, exc)
                os.fsync(self._fd)  # the new size too
            else:
                self._sync_data()
            self._end = 0
            self.records_since_checkpoint = 0

    def close(self) -> None:
        """Close the log, trimmed to its records: a stopped store's log holds exactly them.
        A trim that fails (a failed disk) leaves the zeros, which replay stops at anyway."""
        with self._lock:
            try:
                if self._size > self._end and not self._read_only:
                    os.ftruncate(self._fd, self._end)
                    os.fsync(self._fd)
            except OSError:
                pass
            finally:
                os.close(self._fd)


def _whole_records(data: bytes) -> Iterator[tuple[dict, int]]:
    """Each whole record of a log's bytes, with the offset just past it, up to the first
    torn line (or zero byte)."""
    start = 0
    while (stop := data.find(b"\n", start) + 1) > 0:
        rec = _parse(data[start:stop])
        if rec is None:
            return
        yield rec, stop
        start = stop


def _parse(raw: bytes) -> dict | None:
    """The record on a line; None if the line is torn (no newline, or its CRC fails)."""
    try:
        crc, _, body = raw.rstrip(b"\n").partition(b" ")
        if not raw.endswith(b"\n") or int(crc, 16) != zlib.crc32(body):
            return None
    except ValueError:
        return None
    try:
        rec = json.loads(body)
    except (ValueError, RecursionError):  # whole, but not JSON (or nested thousands deep)
        return {}
    return rec if isinstance(rec, dict) else {}


def _replayable(rec: dict) -> bool:
    """Whether a whole record has the shape replay reads (a hand edit, another program's
    line: its CRC only says it was written whole)."""
    if not isinstance(rec.get("op"), str):
        return False
    if rec.get("step") == "prepare":
        return isinstance(rec.get("kind"), str) and isinstance(rec.get("args", {}), dict)
    return True
