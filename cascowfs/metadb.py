"""The LMDB environment that holds every piece of metadata and every chunk.

LMDB has one writer, and a write transaction must begin and end on one OS thread: here that is
always the committer thread, which runs the transactions of all callers (group commit, see
``MetaDB.write``). Read transactions are short and may run on any thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from .errors import NoSpaceError, StoreIOError
from .privacy import PRIVATE_FILE

T = TypeVar("T")
log = logging.getLogger("cascowfs.metadb")

DB_NAMES = (
    b"objects",  # object id -> type byte + payload (chunks, chunk lists, trees)
    b"snapshots",  # snapshot id -> JSON record
    b"branches",  # branch name -> JSON record
    b"layers",  # layer id -> JSON record: refcount (chain nodes it tops), tree shown, span, seq
    b"chains",  # chain key -> refcount (decimal): records and taller chain nodes holding it
    b"ops",  # WAL op id -> b"applied": the APPLY step of that op committed
    b"meta",  # misc: format version, counters
    b"children",  # parent snapshot id + NUL + child id -> b"": the snapshot tree's edges
    b"labels",  # label key + NUL + snapshot id -> the label's value: find's index
    b"label_order",  # label key + NUL + the value's sort bytes + NUL + snapshot id -> b""
)

# Databases of store formats up to 4 (object refcounts and their queue); the upgrade to
# format 5 drops them.
LEGACY_DB_NAMES = (b"refs", b"deferred")
# Options of every open of the environment, the daemon's and the collector child's alike.
_ENV_OPTIONS = dict(
    max_dbs=len(DB_NAMES) + len(LEGACY_DB_NAMES) + 1, subdir=True, readahead=False, max_readers=512
)

INITIAL_MAP_SIZE = 1 << 30
MAX_MAP_SIZE = 1 << 40


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MADV_DONTNEED = 4


def _madvise(start: int, length: int, advice: int) -> None:
    if _libc.madvise(start, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise of the store's map: {os.strerror(err)}")


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
    if isinstance(exc, lmdb.PanicError):
        return StoreIOError(
            f"{what}: the metadata database stopped after a write failed (a "
            f"failing disk?); mount the store again once the disk is sound"
        )
    if isinstance(exc, lmdb.DiskError) or "Input/output error" in text:
        return StoreIOError(f"{what}: {text}")
    return StoreIOError(f"{what}: LMDB error: {text}")


# An LMDB meta page (pages 0 and 1 of data.mdb), from its 17th byte: magic, format version,
# the page size (the free-page database's md_pad), then the last page in use and the id of
# the transaction that wrote the meta.
_META_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II16xI92xQQ")
_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)


def check_data_file(data_file: Path) -> None:
    """Raise StoreIOError if ``data_file`` holds no valid LMDB meta page or ends before the
    last page its newest meta names.

    LMDB maps the file without checking its length: reading a page past a cut end raises
    SIGBUS, which kills the process without a message."""
    try:
        with open(data_file, "rb") as f:
            head = f.read(2 * _PAGE_SIZES[-1])
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreIOError(f"{data_file}: {exc.strerror}") from None
    if size == 0:
        return  # made but never written: LMDB writes its first pages
    metas = [m for offset in (0, *_PAGE_SIZES) if (m := _meta_at(head, offset)) is not None]
    if not metas:
        raise StoreIOError(
            f"{data_file}: the metadata database is damaged (no LMDB meta page); restore the "
            "store from a backup"
        )
    _, last, psize = max(metas)
    need = (last + 1) * psize
    if size < need:
        raise StoreIOError(
            f"{data_file}: the metadata database is cut short ({size} bytes; its last page "
            f"ends at {need}); restore the store from a backup"
        )


def _meta_at(head: bytes, offset: int) -> tuple[int, int, int] | None:
    """(transaction id, last page, page size) of a valid meta page at ``offset``: page 0, or
    page 1 at an offset of its own page size."""
    if offset + 16 + _META.size > len(head):
        return None
    magic, version, psize, last, txnid = _META.unpack_from(head, offset + 16)
    if magic != _META_MAGIC or version != 1 or psize not in _PAGE_SIZES:
        return None
    if offset not in (0, psize):
        return None
    return txnid, last, psize


class MetaDB:
    """LMDB environment plus named databases, with automatic map growth."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        data_file = path / "data.mdb"
        check_data_file(data_file)
        size = INITIAL_MAP_SIZE
        if data_file.exists():
            while size < data_file.stat().st_size * 2 and size < MAX_MAP_SIZE:
                size *= 2
        try:
            self.env = lmdb.open(
                str(path),
                map_size=size,
                sync=True,
                metasync=True,
                mode=PRIVATE_FILE,
                **_ENV_OPTIONS,
            )
            self.dbs = {name.decode(): self.env.open_db(name) for name in DB_NAMES}
        except lmdb.Error as exc:
            raise _translate(exc, f"opening the metadata database {data_file}", path) from None
        self.release_dead_readers()
        # Map growth needs every transaction of this process closed: readers hold this shared,
        # growth takes it exclusively (a simple writer-preferring gate).
        self._gate = threading.Condition()
        self._readers = 0
        self._growing = False
        self._queue: list[WriteRequest] = []
        self._queue_cond = threading.Condition()
        self._closing = False
        self._release_due = False  # set inside a write transaction, acted on after its commit
        self._committer = threading.Thread(
            target=self._commit_loop, name="cascowfs-lmdb-commit", daemon=True
        )
        self._committer.start()

    def release_dead_readers(self) -> None:
        """Free the reader slots of processes that died inside a read transaction (a killed
        collector child, a daemon killed with -9): until then they keep LMDB from reusing
        the pages their snapshot saw, and the file only grows."""
        self.env.reader_check()

    def db(self, name: str):
        return self.dbs[name]

    def bytes_used(self, txn: lmdb.Transaction, name: str) -> int:
        """Bytes of the pages database ``name`` occupies (its B-tree and overflow pages)."""
        st = txn.stat(self.dbs[name])
        return st["psize"] * (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"])

    def release_after_commit(self) -> None:
        """Have ``release_mapped_pages`` run once the write transaction now running commits
        (call from inside it: a write maps the pages it touches, commit included)."""
        self._release_due = True

    def release_mapped_pages(self) -> None:
        """Unmap the pages of the data file this process has read through LMDB's map.

        Reads go through a read-only shared map of the whole file, and every page read stays
        mapped, counted in the process's RSS, until the kernel wants the memory back: reading
        a 4 GiB file's chunks would show 4 GiB more RSS (a cursor walk over keys alone maps
        every value: ext4's large folios map whole values at a touch). ``MADV_DONTNEED`` on a
        shared file map only drops the page table entries: the pages stay in the page cache,
        and a later read maps them again. Skipped while the map grows (the caller may hold a
        read transaction, which that growth waits for); never waits itself."""
        data_file = os.fsencode(os.path.realpath(self.path / "data.mdb"))
        with self._gate:
            if self._growing:
                return
            self._readers += 1  # the map stays where it is until this is done
        try:
            with open("/proc/self/maps", "rb") as maps:
                ranges = [
                    line.split(None, 1)[0]
                    for line in maps
                    if line.rstrip(b"\n").endswith(b" " + data_file)
                ]
            for span in ranges:
                start, end = (int(x, 16) for x in span.split(b"-"))
                _madvise(start, end - start, _MADV_DONTNEED)
        finally:
            self._leave_gate()

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self._gate:
            while self._growing:
                self._gate.wait()
            self._readers += 1
        try:
            with self.env.begin(buffers=False) as txn:
                yield txn
        except lmdb.Error as exc:  # e.g. MDB_PANIC once a commit failed on a failing disk
            raise _translate(exc, "reading the store", self.path) from exc
        finally:
            self._leave_gate()

    def _leave_gate(self) -> None:
        with self._gate:
            self._readers -= 1
            self._gate.notify_all()

    def write(
        self, fn: Callable[[lmdb.Transaction], T], what: str = "write", *, dry_run: bool = False
    ) -> T:
        """Run ``fn`` in a write transaction, durable when this returns; raises what ``fn``
        raised (its changes undone) or the store's error. ``dry_run``: undo ``fn``'s changes
        anyway and only return its result (fsck looks at the store as it would be after a
        step it does not take).

        Group commit: one committer thread runs every ``fn`` queued meanwhile, each in a
        nested transaction of one outer transaction, and pays one sync for all of them.
        Concurrent operations on a loaded disk otherwise queue behind each other's syncs."""
        return self.submit(fn, what, dry_run=dry_run).wait()

    def submit(
        self,
        fn: Callable[[lmdb.Transaction], Any],
        what: str = "write",
        *,
        dry_run: bool = False,
        on_done: Callable[[WriteRequest], None] | None = None,
    ) -> WriteRequest:
        """Queue ``fn`` as ``write`` does, without waiting: the request's ``wait`` returns
        its result once its batch committed. Requests commit in the order they are queued.
        ``on_done(request)`` runs on the committer thread after that commit (or failure), before
        ``wait`` returns; it must not wait for another write."""
        request = WriteRequest(fn, what, dry_run, on_done)
        with self._queue_cond:
            if self._closing:
                raise StoreIOError(f"{what}: the store is closed")
            self._queue.append(request)
            self._queue_cond.notify()
        return request

    def _commit_loop(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue and not self._closing:
                    self._queue_cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            self._commit_batch(batch)

    def _commit_batch(self, batch: list[WriteRequest]) -> None:
        while True:
            for request in batch:
                request.result, request.error = None, None
            try:
                with self.env.begin(write=True) as txn:
                    for request in batch:
                        try:
                            child = self.env.begin(write=True, parent=txn)
                            try:
                                request.result = request.fn(child)
                            except BaseException:
                                child.abort()
                                raise
                            if request.dry_run:
                                child.abort()
                            else:
                                child.commit()
                        except lmdb.MapFullError:
                            raise
                        except BaseException as exc:  # only this request's changes are undone
                            request.error = exc
                break
            except lmdb.MapFullError:
                try:
                    self._grow()
                except NoSpaceError as exc:
                    for request in batch:
                        request.error = exc
                    break
            except lmdb.Error as exc:
                for request in batch:
                    request.error = request.error or _translate(exc, request.what, self.path)
                break
            except OSError as exc:
                for request in batch:
                    request.error = request.error or (
                        NoSpaceError(f"{request.what}: store disk is full")
                        if exc.errno == errno.ENOSPC
                        else StoreIOError(f"{request.what}: {exc}")
                    )
                break
        if self._release_due:
            self._release_due = False
            self.release_mapped_pages()
        for request in batch:
            if request.on_done is not None:
                try:
                    request.on_done(request)
                except Exception:  # the batch is committed: its waiters must hear of it
                    log.exception("%s: after %s", self.path, request.what)
            request.done.set()

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

    def drop_legacy(self, txn: lmdb.Transaction) -> None:
        """Delete the databases of older store formats (``LEGACY_DB_NAMES``), if there."""
        for name in LEGACY_DB_NAMES:
            try:
                handle = self.env.open_db(name, txn=txn, create=False)
            except lmdb.NotFoundError:
                continue
            txn.drop(handle, delete=True)

    def close(self) -> None:
        with self._queue_cond:
            self._closing = True
            self._queue_cond.notify()
        self._committer.join()
        self.env.close()


def open_reader(path: str | Path) -> tuple[lmdb.Environment, dict]:
    """The store's LMDB environment opened read-only from another process (the collector's
    marking child), with its named databases; a daemon may be writing meanwhile."""
    env = lmdb.open(str(path), readonly=True, lock=True, **_ENV_OPTIONS)
    return env, {name.decode(): env.open_db(name, create=False) for name in DB_NAMES}


class WriteRequest:
    """One ``fn`` queued for the committer (``MetaDB.submit``)."""

    __slots__ = ("fn", "what", "dry_run", "on_done", "result", "error", "done")

    def __init__(
        self, fn: Callable, what: str, dry_run: bool, on_done: Callable | None = None
    ) -> None:
        self.fn = fn
        self.what = what
        self.dry_run = dry_run
        self.on_done = on_done
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def wait(self) -> Any:
        """``fn``'s result once its batch committed; raises what it raised or the store's
        error."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result
