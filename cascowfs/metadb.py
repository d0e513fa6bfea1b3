"""The LMDB environment that holds every piece of metadata and every chunk.

One writer at a time: a write transaction begins and ends on one OS thread (LMDB's rule), which
the callers guarantee by running each mutation start-to-end on the thread that called it under
the StateManager's operation lock. Read transactions are short and may run on any thread.
"""

from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb

from .errors import NoSpaceError, StoreIOError

T = TypeVar("T")

DB_NAMES = (
    b"objects",    # object id -> type byte + payload (chunks, chunk lists, trees)
    b"refs",       # object id -> refcount (u64 little endian); absent means zero
    b"snapshots",  # snapshot id -> JSON record
    b"branches",   # branch name -> JSON record
    b"layers",     # layer id -> refcount (u64): snapshot and branch chains naming it
    b"ops",        # WAL op id -> b"applied": the APPLY step of that op committed
    b"meta",       # misc: format version, counters
)

INITIAL_MAP_SIZE = 1 << 30
MAX_MAP_SIZE = 1 << 40


# LMDB reports a write that hit a full disk as EIO from mdb_txn_commit; below this much free
# space an EIO is taken for what it almost certainly is.
_LOW_SPACE = 8 << 20


def _disk_nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _LOW_SPACE


def _translate(exc: lmdb.Error, what: str, path: Path) -> Exception:
    text = str(exc)
    if "No space left" in text or "ENOSPC" in text or _disk_nearly_full(path):
        return NoSpaceError(f"{what}: store disk is full")
    if isinstance(exc, lmdb.DiskError) or "Input/output error" in text:
        return StoreIOError(f"{what}: {text}")
    return StoreIOError(f"{what}: LMDB error: {text}")


class MetaDB:
    """LMDB environment plus named databases, with automatic map growth."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        data_file = path / "data.mdb"
        size = INITIAL_MAP_SIZE
        if data_file.exists():
            while size < data_file.stat().st_size * 2 and size < MAX_MAP_SIZE:
                size *= 2
        self.env = lmdb.open(
            str(path), map_size=size, max_dbs=len(DB_NAMES) + 1, sync=True,
            metasync=True, readahead=False, max_readers=512, subdir=True,
        )
        self.dbs = {name.decode(): self.env.open_db(name) for name in DB_NAMES}
        # Map growth needs every transaction of this process closed: readers hold this shared,
        # growth takes it exclusively (a simple writer-preferring gate).
        self._gate = threading.Condition()
        self._readers = 0
        self._growing = False
        # LMDB has one writer; taking this lock (with the GIL released while waiting) first
        # keeps threads from queueing inside mdb_txn_begin instead.
        self._write_lock = threading.Lock()

    def db(self, name: str):
        return self.dbs[name]

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self._gate:
            while self._growing:
                self._gate.wait()
            self._readers += 1
        try:
            with self.env.begin(buffers=False) as txn:
                yield txn
        finally:
            with self._gate:
                self._readers -= 1
                self._gate.notify_all()

    def write(self, fn: Callable[[lmdb.Transaction], T], what: str = "write") -> T:
        """Run ``fn`` in one write transaction; grow the map and retry on MapFullError."""
        with self._write_lock:
            return self._write_locked(fn, what)

    def _write_locked(self, fn: Callable[[lmdb.Transaction], T], what: str) -> T:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                raise _translate(exc, what, self.path) from exc
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise NoSpaceError(f"{what}: store disk is full") from exc
                raise

    def _grow(self) -> None:
        with self._gate:
            self._growing = True
            try:
                while self._readers:
                    self._gate.wait()
                new_size = self.env.info()["map_size"] * 2
                if new_size > MAX_MAP_SIZE:
                    raise NoSpaceError("metadata store reached its maximum map size")
                self.env.set_mapsize(new_size)
            finally:
                self._growing = False
                self._gate.notify_all()

    def close(self) -> None:
        self.env.close()
