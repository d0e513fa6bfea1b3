"""An import's file work: reading, cutting, hashing, compressing and mirroring every file.

The walk of the source hands each regular file to ``ImportWorkers.add`` as it finds it and
takes the results back, in the order the files were handed over, with ``ready`` (whatever is
done, while it walks on) and ``rest`` (everything else, once the walk is over).

Small imports run on a few threads after the walk: reading, hashing, compressing and writing
release the GIL, and forking would cost more than it saves. Once the files found pass
``PROCESS_POOL_MIN_FILES`` or ``PROCESS_POOL_MIN_BYTES``, worker processes (one per core, plus
one) are forked and take them in batches from then on, while the walk goes on: on L (1.3 GB,
80k files) the cold walk alone takes ~2.5 s, a fifth of the import, and the cores were idle
through it. A readahead thread (``readahead.py``) asks the kernel for the files just ahead of
the workers.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, NamedTuple

from . import extents, forks, fsmeta
from .beneath import Identity, identity
from .cas import Emit, Piece, PreparedContent, pack_unpacked
from .codec import IMPORT_ZSTD_LEVEL
from .errors import BusyError, FileTooLargeError
from .pathquote import quote
from .privacy import Caller, reading_as
from .readahead import Readahead

Prepare = Callable[[Iterable[Piece], Emit | None], PreparedContent]

IMPORT_THREADS = 3
# Big imports are GIL-bound in threads (measured: CPU time == wall time on 2 cores), so they go
# to one worker process per core, in batches that amortize the pickling.
# Per-file work (a dozen system calls and the Python around them) holds the GIL too: on M
# (44 MB in 6.8k files) threads after the walk take 2.2 s, processes from the 512th file 1.2 s.
# Forking the workers costs ~20 ms, more than 50 files take on threads.
PROCESS_POOL_MIN_FILES = 512
PROCESS_POOL_MIN_BYTES = 64 << 20
IMPORT_PROCESSES = (os.cpu_count() or 1) + 1  # one more than cores: cold reads wait on the disk
PROCESS_BATCH_BYTES = 8 << 20
PROCESS_BATCH_FILES = 256
# A file this big is not read by a worker but streamed on the calling thread, its objects
# handed to ``emit`` as they are made: a worker returns a file's objects all at once.
STREAMED_FILE_MIN = 32 << 20
# A file's content is a list of 36-byte items, a hole one per GiB: a sparse file of 2**63 - 1
# bytes (tmpfs, xfs and btrfs allow it) listed 8.6e9 of them, and the daemon ran out of memory
# committing it. 16 TiB is ext4's largest file: at most 16,384 hole items.
MAX_FILE_BYTES = 16 << 40


class FileJob(NamedTuple):
    node: Any  # the directory node the file's entry goes into (the walk's business)
    name: bytes
    path: bytes
    st: os.stat_result
    mirror: bytes | None  # where to write a copy (the layer), if anywhere


# content id, size, xattrs, objects (a batch's packed small chunks ride with its first file)
FileResult = tuple[bytes, int, tuple, list[tuple[bytes, bytes]]]


class Mirror(NamedTuple):
    """Where an import writes its copy of a file (in the layer), with the file's metadata."""

    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int


# a source file opened for reading, and its xattrs read through that open
Opened = tuple[int, tuple]


def open_source(path: bytes) -> Opened:
    """``path`` opened (never through a symbolic link at its end) and its xattrs. A walk
    listed it: gone now, it is BusyError naming it, as any file changed under a walk."""
    try:
        fd = fsmeta.open_file(path)
    except FileNotFoundError:
        raise BusyError(
            f"{quote(path)}: removed since the walk saw it; try again once it rests"
        ) from None
    try:
        return fd, fsmeta.read_xattrs(fd)
    except BaseException:
        os.close(fd)
        raise


def _open_all(paths: list[bytes], reader: Caller | None) -> list[Opened]:
    """Every path opened as ``reader``, in one switch of credentials (a switch costs tens of
    microseconds: one per file would cost more than opening it)."""
    opened: list[Opened] = []
    try:
        with reading_as(reader):
            for path in paths:
                opened.append(open_source(path))
    except BaseException:
        for fd, _ in opened:
            os.close(fd)
        raise
    return opened


def read_content(
    path: bytes,
    prepare: Prepare,
    emit: Emit | None = None,
    mirror: Mirror | None = None,
    reader: Caller | None = None,
    opened: Opened | None = None,
    walked: Identity | None = None,
) -> tuple[PreparedContent, tuple]:
    """The content of the regular file ``path`` prepared as a stream (objects through
    ``emit``, if given) and its xattrs, both read through one open (as ``reader``,
    ``privacy.reading_as``, unless ``opened`` is that open already, which this closes);
    with ``mirror`` a copy, holes kept, is written from the very bytes read. ``walked``:
    the ``identity`` of the file a walk's ``lstat`` found at ``path``, whose mode and owner
    the caller records with these bytes; another file opened there is BusyError."""
    if opened is None:
        with reading_as(reader):
            opened = open_source(path)
    fd, xattrs = opened
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):  # a FIFO, say, swapped in since the walk
            raise BusyError(f"{quote(path)}: no longer a regular file; try again once it rests")
        if walked is not None and identity(before) != walked:
            # Another file at the path since the walk saw it there (an ancestor swapped for a
            # symbolic link and back, a file deleted and its inode number taken again): its
            # bytes under the walk's mode and owner would give the caller a file of someone
            # else's, set-id root among them.
            raise BusyError(
                f"{quote(path)}: replaced since the walk saw it; try again once it rests"
            )
        if before.st_size > MAX_FILE_BYTES:
            raise FileTooLargeError(
                f"{quote(path)}: {before.st_size} bytes, over the "
                f"{MAX_FILE_BYTES >> 40} TiB a snapshot's file may hold"
            )
        os.set_blocking(fd, True)  # opened without (fsmeta.open_file)
        pieces = extents.read_pieces(fd, before.st_size)
        if mirror is None:
            prepared = prepare(pieces, emit)
        else:
            out = fsmeta.create_file(mirror.path)
            try:
                prepared = prepare(extents.copied(pieces, out), emit)
                fsmeta.finish_file(
                    out,
                    mirror.mode,
                    mirror.uid,
                    mirror.gid,
                    mirror.mtime_ns,
                    xattrs,
                    shown=mirror.path,
                )
            finally:
                os.close(out)
        _unchanged_since(fd, before, path)
        return prepared, xattrs
    finally:
        os.close(fd)


def _unchanged_since(fd: int, before: os.stat_result, path: bytes) -> None:
    """Raise BusyError if the file open as ``fd`` changed since ``before``: what was read
    may mix two versions of it (a prefix of the old one, say), which the file never held."""
    after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
        before.st_size,
        before.st_mtime_ns,
        before.st_ctime_ns,
    ):
        raise BusyError(f"{quote(path)}: changed while it was read; try again once it rests")


def _process_one(
    path: bytes,
    mirror: bytes | None,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    walked: Identity,
    prepare: Prepare,
    emit: Emit | None = None,
    reader: Caller | None = None,
    opened: Opened | None = None,
) -> FileResult:
    prepared, xattrs = read_content(
        path,
        prepare,
        emit,
        Mirror(mirror, mode, uid, gid, mtime_ns) if mirror else None,
        reader,
        opened,
        walked,
    )
    return prepared.content_id, prepared.size, xattrs, prepared.objects


# path, mirror, mode, uid, gid, mtime_ns, the walk's identity of the file: what a worker
# process needs of a FileJob
WorkItem = tuple[bytes, bytes | None, int, int, int, int, Identity]


def _work_item(job: FileJob) -> WorkItem:
    st = job.st
    return job.path, job.mirror, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, identity(st)


def _process_batch(
    batch: list[WorkItem], prepare: Prepare, reader: Caller | None
) -> list[FileResult]:
    """A worker process's share: its small chunks leave it already packed and compressed
    (the packs ride along with the batch's first file)."""
    sources = _open_all([item[0] for item in batch], reader)
    results: list[FileResult] = []
    try:
        for item, source in zip(batch, sources, strict=True):
            results.append(_process_one(*item, prepare, None, None, source))
    finally:
        for fd, _ in sources[len(results) + 1 :]:  # read_content closed the one that failed
            os.close(fd)
    objects = pack_unpacked([o for *_, objs in results for o in objs], IMPORT_ZSTD_LEVEL)
    if not results:
        return results
    first = results[0]
    return [first[:3] + (objects,)] + [r[:3] + ([],) for r in results[1:]]


def _batches(jobs: list[FileJob]) -> Iterator[list[FileJob]]:
    batch: list[FileJob] = []
    total = 0
    for job in jobs:
        batch.append(job)
        total += job.st.st_size
        if total >= PROCESS_BATCH_BYTES or len(batch) >= PROCESS_BATCH_FILES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def _in_disk_order(jobs: list[FileJob]) -> list[FileJob]:
    return sorted(jobs, key=lambda job: job.st.st_ino)  # cold reads are seeks otherwise


class ImportWorkers:
    """File jobs in, (job, result) out in the order the jobs were dispatched. A context
    manager: leaving it stops the readahead and the workers (cancelling what is queued if
    it is left by an exception)."""

    def __init__(
        self, prepare: Prepare, emit: Emit | None = None, reader: Caller | None = None
    ) -> None:
        self._prepare = prepare
        self._emit = emit
        self._reader = reader  # whose credentials the source is read with
        self._streamed: list[FileJob] = []
        self._waiting: list[FileJob] = []
        self._waiting_bytes = 0
        self._dispatched: deque[tuple[list[FileJob], Future]] = deque()
        self._processes: ProcessPoolExecutor | None = None
        self._readahead: Readahead | None = None

    def __enter__(self) -> ImportWorkers:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:
            if self._readahead is not None:
                self._readahead.__exit__(None, None, None)
        finally:
            if self._processes is not None:
                self._processes.shutdown(wait=True, cancel_futures=exc_type is not None)

    def add(self, job: FileJob) -> None:
        if job.st.st_size >= STREAMED_FILE_MIN:
            self._streamed.append(job)
            return
        self._waiting.append(job)
        self._waiting_bytes += job.st.st_size
        if self._processes is None:
            small = (
                len(self._waiting) < PROCESS_POOL_MIN_FILES
                and self._waiting_bytes < PROCESS_POOL_MIN_BYTES
            )
            if small or (os.cpu_count() or 1) < 2:
                return
            # fork, not spawn: spawn (and forkserver) re-run the caller's __main__ in every
            # worker. The children only read, hash, compress and write files: they touch no
            # LMDB environment inherited from the parent, hold no store lock or FUSE channel
            # (forks.py closes those) and exit with the pool, or with the parent if it is
            # killed.
            self._processes = ProcessPoolExecutor(
                IMPORT_PROCESSES,
                mp_context=multiprocessing.get_context("fork"),
                initializer=forks.die_with_parent,
                initargs=(os.getpid(),),
            )
        if self._waiting_bytes >= PROCESS_BATCH_BYTES or len(self._waiting) >= PROCESS_BATCH_FILES:
            self._dispatch_waiting()

    def ready(self) -> Iterator[tuple[FileJob, FileResult]]:
        """The results that are done, in order, without waiting for any."""
        while self._dispatched and self._dispatched[0][1].done():
            yield from self._take_first()

    def rest(self) -> Iterator[tuple[FileJob, FileResult]]:
        """Every result not yet taken, in order (the big files last); no more jobs may be
        added."""
        if self._processes is None:
            yield from self._on_threads(_in_disk_order(self._waiting))
            self._waiting = []
        else:
            if self._waiting:
                self._dispatch_waiting()
            while self._dispatched:
                yield from self._take_first()
        for job in self._streamed:
            yield job, _process_one(*_work_item(job), self._prepare, self._emit, self._reader)
        self._streamed = []

    def _dispatch_waiting(self) -> None:
        assert self._processes is not None
        for batch in _batches(_in_disk_order(self._waiting)):
            future = self._processes.submit(
                _process_batch, [_work_item(j) for j in batch], self._prepare, self._reader
            )
            self._dispatched.append((batch, future))
            if self._readahead is None:
                # only now: the first submit forked every worker (fork start method), and
                # a process should not fork while this thread runs
                self._readahead = Readahead(reader=self._reader).__enter__()
            self._readahead.add([job.path for job in batch], [job.st.st_size for job in batch])
        self._waiting, self._waiting_bytes = [], 0

    def _take_first(self) -> Iterator[tuple[FileJob, FileResult]]:
        assert self._readahead is not None
        batch, future = self._dispatched.popleft()
        for job, result in zip(batch, future.result(), strict=True):
            self._readahead.consumed(job.st.st_size)
            yield job, result

    def _on_threads(self, jobs: list[FileJob]) -> Iterator[tuple[FileJob, FileResult]]:
        prepare, reader = self._prepare, self._reader
        with (
            ThreadPoolExecutor(IMPORT_THREADS, thread_name_prefix="cascowfs-scan") as pool,
            Readahead(reader=reader) as readahead,
        ):
            readahead.add([job.path for job in jobs], [job.st.st_size for job in jobs])
            results = pool.map(
                lambda job: _process_one(*_work_item(job), prepare, None, reader), jobs
            )
            for job, result in zip(jobs, results, strict=True):
                readahead.consumed(job.st.st_size)
                yield job, result
