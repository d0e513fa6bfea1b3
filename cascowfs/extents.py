"""File content as a stream of bounded pieces, holes kept, for reading and for writing.

A file can be bigger than the daemon's memory, and a sparse one can be bigger than its disk:
content is read in ``STREAM_PIECE`` pieces and never joined. Reading asks the filesystem
where the data is (SEEK_DATA/SEEK_HOLE): a hole is not read at all, it is a count of zeros
(an int piece). Writing skips holes and zero chunks, so a layer's file has a hole wherever
its content has one, and truncates to the end.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator

from .cas import HOLE_BLOCK, STREAM_PIECE, Piece, zero_runs


def read_pieces(fd: int, size: int) -> Iterator[Piece]:
    """The first ``size`` bytes of the open regular file ``fd`` with its holes as
    ``cas.zero_runs`` gives them; a file that shrinks meanwhile ends where it ends."""
    return zero_runs(_raw_pieces(fd, size))


def _raw_pieces(fd: int, size: int) -> Iterator[Piece]:
    pos = 0
    for start, end in _data_regions(fd, size):
        if start > pos:
            yield start - pos
        pos = start
        while pos < end:
            want = min(STREAM_PIECE, end - pos)
            data = os.pread(fd, want, pos)
            if data:
                yield data
            if len(data) < want:
                return  # truncated meanwhile
            pos += want
    if pos < size:
        yield size - pos


def _data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) ranges that hold all the data of the file, on the ``HOLE_BLOCK`` grid
    (so that every int piece between them is whole blocks), merged, in order."""
    pos = 0
    region: tuple[int, int] | None = None
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # nothing but a hole from pos on
            if exc.errno != errno.EINVAL:
                raise
            start, end = pos, size  # a filesystem that cannot tell: all data
        if start >= size:
            break
        aligned = (start // HOLE_BLOCK * HOLE_BLOCK, min(-(-end // HOLE_BLOCK) * HOLE_BLOCK, size))
        if region is not None and aligned[0] <= region[1]:
            region = (region[0], aligned[1])
        else:
            if region is not None:
                yield region
            region = aligned
        pos = end
    if region is not None:
        yield region


def _is_zero(data: bytes) -> bool:
    return not data[0] and not data[-1] and data.count(0) == len(data)


def write_pieces(fd: int, pieces: Iterable[Piece]) -> None:
    """Write a content stream into the new, empty file ``fd``: holes and all-zero pieces
    (chunks of stores made before holes were kept) are skipped, and the file is truncated
    to the stream's length."""
    for _ in copied(pieces, fd):
        pass


def copied(pieces: Iterable[Piece], fd: int) -> Iterator[Piece]:
    """``pieces``, written into the new, empty file ``fd`` as they pass (``write_pieces``)."""
    pos = 0
    for piece in pieces:
        if isinstance(piece, int):
            pos += piece
        else:
            if piece and not _is_zero(piece):
                view = memoryview(piece)
                at = pos
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
            pos += len(piece)
        yield piece
    os.ftruncate(fd, pos)


def same_content(a: int, b: int, size: int) -> bool:
    """Whether the open regular files ``a`` and ``b`` hold the same first ``size`` bytes.
    Holes are compared as the zeros they read as, without reading them: two copies of a
    sparse file of terabytes compare in the time their data takes, not hours."""
    left, right = read_pieces(a, size), read_pieces(b, size)
    here: Piece = 0
    there: Piece = 0
    while True:
        if not _length(here):
            here = next(left, b"")
        if not _length(there):
            there = next(right, b"")
        n = min(_length(here), _length(there))
        if n == 0:
            return _length(here) == _length(there)  # both ended (or one file shrank)
        if isinstance(here, bytes) or isinstance(there, bytes):
            if _head(here, n) != _head(there, n):
                return False
        here, there = _rest(here, n), _rest(there, n)


def _length(piece: Piece) -> int:
    return piece if isinstance(piece, int) else len(piece)


def _head(piece: Piece, n: int) -> bytes:
    return bytes(n) if isinstance(piece, int) else piece[:n]


def _rest(piece: Piece, n: int) -> Piece:
    return piece - n if isinstance(piece, int) else piece[n:]
