"""Content-addressed object store: chunks, chunk lists, packs and trees.

Ids and compression are ``codec.py``'s; tree objects are encoded by ``trees.py``, which this
store reads to follow a tree's references and verify it.

Objects form a DAG (tree -> tree | content; chunk list -> chunk; chunk pointer -> pack). What
no live root reaches is deleted by the collector (collector.py), which this store helps by
remembering, while a collection runs, every object stored meanwhile.

File content is cut and read as a stream of bounded pieces, never held whole: a checkpoint
or disk image is bigger than the daemon's memory. Its zeros are holes, not chunks: every
whole ``HOLE_BLOCK`` of zeros (on a grid from offset 0) is a hole item in the chunk list, so
a sparse file and a file that writes the same zeros have one content id, no zero chunk is
stored, and layers written from either keep the holes.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import os
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import lmdb
from fastcdc import fastcdc

from .codec import (
    ID_SIZE,
    TYPE_CHUNK,
    TYPE_LIST,
    TYPE_PACK,
    TYPE_TREE,
    ZSTD_LEVEL,
    compress,
    decompress,
    object_id,
)
from .errors import StoreIOError
from .metadb import MetaDB
from .trees import stored_payload, stored_tree_value, tree_children

# Chunk sizes: bench-results/NOTES.md ("Chunks") has the measurement behind them.
CHUNK_MIN = 16 * 1024
CHUNK_AVG = 64 * 1024
CHUNK_MAX = 256 * 1024

# second byte of a chunk's stored value
_RAW = b"\x00"  # the data itself
_ZSTD = b"\x01"  # zstd frame (chunks stored by versions before every chunk was packed)
_PACKED = b"\x02"  # pointer: pack id, offset, length (the data lives in a pack object)
_UNPACKED = b"\x03"  # raw chunk on its way into a pack; never stored as such
_POINTER = struct.Struct("<32sII")
# Chunks are compressed together in packs of about PACK_TARGET bytes, never one by one: LMDB
# rounds every value above ~2 KiB up to whole 4 KiB overflow pages, and zstd finds more to
# share across chunks (bench-results/NOTES.md, "Packs", has the measurements).
PACK_TARGET = 256 * 1024
_LIST_ITEM = struct.Struct("<32sI")

# A chunk list item with this id is a hole: that many zero bytes, no object. No BLAKE3 output
# is all zeros (finding one is a preimage attack), so it can never name a stored chunk.
HOLE_ID = bytes(ID_SIZE)
HOLE_BLOCK = 64 * 1024  # the zero runs that become holes: whole blocks of this grid
HOLE_ITEM_MAX = 1 << 30  # a list item's length is 32 bits; longer holes take several items
_ZERO_BLOCK = bytes(HOLE_BLOCK)
# Content streams through the cutter in pieces of this size (a multiple of HOLE_BLOCK), and
# its objects leave in batches of about EMIT_BYTES: with the object sink's batch and its
# packs, that bounds the memory an import or commit takes whatever the file sizes.
STREAM_PIECE = 4 << 20
EMIT_BYTES = 8 << 20

# A piece of a content stream: data, or an int, that many zero bytes (a hole)
Piece = bytes | int
Emit = Callable[[list[tuple[bytes, bytes]]], None]


class PreparedContent:
    """A file's content cut, hashed and compressed, ready to be written in a transaction."""

    __slots__ = ("content_id", "size", "objects")

    def __init__(self, content_id: bytes, size: int, objects: list[tuple[bytes, bytes]]) -> None:
        self.content_id = content_id
        self.size = size
        self.objects = objects  # (id, stored value) for every chunk and the list, if any


def zero_runs(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """A content stream with its holes made canonical: every run of whole ``HOLE_BLOCK``s of
    zeros, read or known, becomes an int, and everything else bytes (zeros of a last partial
    block included). ``pieces`` must start and end on the block grid except at the end of
    the content (``extents.read_pieces`` and ``pieces_of`` give such streams)."""
    for piece in pieces:
        if isinstance(piece, int):
            whole, tail = divmod(piece, HOLE_BLOCK)
            if whole:
                yield whole * HOLE_BLOCK
            if tail:
                yield bytes(tail)
            continue
        view = memoryview(piece)
        start = 0  # of the data not yet given out
        for at in range(0, len(piece) - HOLE_BLOCK + 1, HOLE_BLOCK):
            # the two ends first: data is rarely zero there, and the full test copies
            if (
                not piece[at]
                and not piece[at + HOLE_BLOCK - 1]
                and view[at : at + HOLE_BLOCK].tobytes() == _ZERO_BLOCK
            ):
                if at > start:
                    yield piece[start:at]
                yield HOLE_BLOCK
                start = at + HOLE_BLOCK
        if start < len(piece):
            yield piece[start:] if start else piece


def pieces_of(data: bytes) -> Iterator[Piece]:
    """``data`` as a content stream of ``STREAM_PIECE`` pieces."""
    for at in range(0, len(data), STREAM_PIECE):
        yield data[at : at + STREAM_PIECE]


class ContentCutter:
    """Cuts a content stream into chunks and holes as it comes, keeping only a window of it.

    Data between holes is cut by FastCDC as if it were a file of its own. A cut depends on
    at most ``CHUNK_MAX`` bytes from the chunk's start, so the chunks of a window whose start
    lies ``CHUNK_MAX`` or more before its end are those of the whole stream; the rest is
    carried into the next window. With ``store`` every chunk becomes an object (handed to
    ``emit`` in batches, or kept in ``objects`` without one); without it only ids are made."""

    def __init__(self, store: bool, emit: Emit | None = None) -> None:
        self.size = 0
        self.objects: list[tuple[bytes, bytes]] = []
        self._store = store
        self._emit = emit
        self._pending = 0
        self._window = bytearray()
        self._listing = bytearray()
        self._only_chunk: bytes | None = None  # the id, while one chunk is all there is
        self._hole_tail = 0  # the length of the last item if it is a hole

    def add(self, piece: Piece) -> None:
        if isinstance(piece, int):
            self._cut(final=True)
            self.size += piece
            # a run of zeros is one item per HOLE_ITEM_MAX however its pieces came
            if self._hole_tail:
                grown = min(HOLE_ITEM_MAX, self._hole_tail + piece)
                del self._listing[-_LIST_ITEM.size :]
                self._listing += _LIST_ITEM.pack(HOLE_ID, grown)
                piece -= grown - self._hole_tail
                self._hole_tail = grown
            while piece:
                self._hole_tail = min(piece, HOLE_ITEM_MAX)
                self._listing += _LIST_ITEM.pack(HOLE_ID, self._hole_tail)
                piece -= self._hole_tail
            self._only_chunk = None
            return
        self._window += piece
        self.size += len(piece)
        if len(self._window) >= STREAM_PIECE + CHUNK_MAX:
            self._cut(final=False)

    def finish(self) -> PreparedContent:
        self._cut(final=True)
        if not self._listing:
            return PreparedContent(b"", 0, self.objects)
        if self._only_chunk is not None:
            return PreparedContent(self._only_chunk, self.size, self.objects)
        listing = bytes(self._listing)
        list_id = object_id(TYPE_LIST, listing)
        if self._store:
            self.objects.append((list_id, TYPE_LIST + listing))
        return PreparedContent(list_id, self.size, self.objects)

    def _cut(self, final: bool) -> None:
        if not self._window:
            return
        data = bytes(self._window)
        view = memoryview(data)
        taken = 0
        if len(data) <= CHUNK_MIN:
            self._chunk(view)
            taken = len(data)
        else:
            for c in fastcdc(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX, fat=False):
                if not final and c.offset + CHUNK_MAX > len(data):
                    break
                self._chunk(view[c.offset : c.offset + c.length])
                taken = c.offset + c.length
        del self._window[:taken]

    def _chunk(self, piece: memoryview) -> None:
        oid = object_id(TYPE_CHUNK, piece)
        self._hole_tail = 0
        self._only_chunk = oid if not self._listing else None
        self._listing += _LIST_ITEM.pack(oid, len(piece))
        if not self._store:
            return
        self.objects.append((oid, TYPE_CHUNK + _UNPACKED + bytes(piece)))
        self._pending += len(piece)
        if self._emit is not None and self._pending >= EMIT_BYTES:
            self._emit(self.objects)
            self.objects, self._pending = [], 0


def prepare_content(content: bytes | Iterable[Piece], emit: Emit | None = None) -> PreparedContent:
    """Cut ``content`` (bytes, or a stream of pieces) into chunks and holes and build the
    objects that store it; with ``emit``, those pass through it in batches as they are made
    and only the rest are in the result. Empty content has id b""."""
    return _cut_content(content, ContentCutter(True, emit))


def identify_content(content: bytes | Iterable[Piece], emit: Emit | None = None) -> PreparedContent:
    """Only the content id of ``content`` (no compression, no objects): for status and diff."""
    return _cut_content(content, ContentCutter(False))


def _cut_content(content: bytes | Iterable[Piece], cutter: ContentCutter) -> PreparedContent:
    if isinstance(content, (bytes, bytearray)):
        content = pieces_of(bytes(content))
    for piece in zero_runs(content):
        cutter.add(piece)
    return cutter.finish()


def build_pack(
    chunks: list[tuple[bytes, bytes]], level: int = ZSTD_LEVEL
) -> list[tuple[bytes, bytes]]:
    """One pack holding ``chunks`` (id, raw data), compressed at zstd ``level``: the pack
    object, then a pointer per chunk."""
    raw = b"".join(data for _, data in chunks)
    pack_id = object_id(TYPE_PACK, raw)
    packed = compress(raw, level)
    objects = [(pack_id, TYPE_PACK + (_ZSTD + packed if len(packed) < len(raw) else _RAW + raw))]
    offset = 0
    for oid, data in chunks:
        objects.append((oid, TYPE_CHUNK + _PACKED + _POINTER.pack(pack_id, offset, len(data))))
        offset += len(data)
    return objects


def pack_unpacked(
    objects: list[tuple[bytes, bytes]], level: int = ZSTD_LEVEL, *, parallel: bool = False
) -> list[tuple[bytes, bytes]]:
    """Turn the raw chunks among ``objects`` into packs and pointers, compressed at zstd
    ``level`` (import workers do this, so the compression happens in parallel and far fewer
    bytes cross the pipe; operations do it before their write transaction, so compression
    never holds up LMDB's one writer). ``parallel``: compress the packs on a thread per core
    (zstd releases the GIL), for an operation whose caller waits for them."""
    out, groups, raw, seen, size = [], [], [], set(), 0
    for oid, value in objects:
        if value[:2] != TYPE_CHUNK + _UNPACKED:
            out.append((oid, value))
        elif oid not in seen:
            seen.add(oid)
            raw.append((oid, value[2:]))
            size += len(value) - 2
            if size >= PACK_TARGET:
                groups.append(raw)
                raw, size = [], 0
    if raw:
        groups.append(raw)
    build = functools.partial(build_pack, level=level)
    if parallel and len(groups) > 1:
        # threads made per call (~0.1 ms): two packs take milliseconds to compress, and no
        # pool outlives the operation
        workers = min(len(groups), os.cpu_count() or 1)
        with ThreadPoolExecutor(workers, thread_name_prefix="cascowfs-pack") as pool:
            packs = list(pool.map(build, groups))
    else:
        packs = list(map(build, groups))
    for pack in packs:
        out.extend(pack)
    return out


def children_of(value: bytes) -> list[bytes]:
    """Ids an object references (with multiplicity), from its stored value."""
    kind = value[:1]
    if kind == TYPE_CHUNK:
        return [_POINTER.unpack_from(value, 2)[0]] if value[1:2] == _PACKED else []
    if kind == TYPE_PACK:
        return []
    if kind == TYPE_LIST:
        body = memoryview(value)[1:]
        ids = (bytes(body[i : i + ID_SIZE]) for i in range(0, len(body), _LIST_ITEM.size))
        return [oid for oid in ids if oid != HOLE_ID]
    if kind == TYPE_TREE:
        return tree_children(stored_payload(value))
    raise StoreIOError(f"object of unknown type {kind!r}")


def payload_children(kind: bytes, payload: bytes) -> list[bytes]:
    """Ids an object references, from its kind and payload (the form objects travel in)."""
    if kind == TYPE_TREE:
        return tree_children(payload)
    if kind == TYPE_LIST:
        return [oid for oid, _ in _LIST_ITEM.iter_unpack(payload) if oid != HOLE_ID]
    return []


def content_size(kind: bytes, payload: bytes) -> int:
    """How many bytes of file content an object holds, from its kind and payload: a chunk's
    own, a chunk list's items' together (holes included). EIO for any other object."""
    if kind == TYPE_CHUNK:
        return len(payload)
    if kind == TYPE_LIST and len(payload) % _LIST_ITEM.size == 0:
        return sum(length for _, length in _LIST_ITEM.iter_unpack(payload))
    raise StoreIOError(f"an object of type {kind!r} is not file content")


def value_of_payload(kind: bytes, payload: bytes) -> bytes:
    """The value to store for an object given by kind and payload (a chunk raw, to be packed
    by ``pack_missing``)."""
    if kind == TYPE_CHUNK:
        return TYPE_CHUNK + _UNPACKED + payload
    if kind == TYPE_TREE:
        return stored_tree_value(payload)
    if kind == TYPE_LIST:
        return TYPE_LIST + payload
    raise StoreIOError(f"object of unknown type {kind!r}")


MAP_RELEASE_BYTES = 16 << 20
# what one read of a value may map, however small the value: ext4 maps the whole large folio
# around a page touched, other values' pages with it
MAPPED_PER_TOUCH = 256 << 10
RELEASE_AFTER_WRITE_BYTES = 1 << 20  # more than an agent's commit of small files writes
RELEASE_AFTER_OBJECTS = 64
LISTINGS_CACHED = 16  # chunk lists of open big files, each with an index of its offsets


class _Listing:
    """A chunk list with the offset of every item, for reads at any offset in log time."""

    __slots__ = ("body", "starts", "size")

    def __init__(self, body: memoryview) -> None:
        self.body = body
        lengths = (length for _, length in _LIST_ITEM.iter_unpack(body))
        self.starts = array("Q", itertools.accumulate(lengths, initial=0))
        self.size = self.starts[-1]

    def items_from(self, offset: int) -> Iterator[tuple[bytes, int, int]]:
        """(id, start, length) of every item from the one holding ``offset`` on."""
        first = max(0, bisect.bisect_right(self.starts, offset) - 1)
        for i in range(first, len(self.starts) - 1):
            oid, length = _LIST_ITEM.unpack_from(self.body, i * _LIST_ITEM.size)
            yield oid, self.starts[i], length


class ContentStore:
    """Objects in LMDB; chunk reads with a small cache of decompressed chunks and packs."""

    def __init__(self, db: MetaDB, cache_chunks: int = 256) -> None:
        self.db = db
        self.objects = db.db("objects")
        self._protected: set[bytes] | None = None
        self._protect_lock = threading.Lock()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_size = cache_chunks
        self._cache_lock = threading.Lock()
        self._listings: OrderedDict[bytes, _Listing] = OrderedDict()
        self._mapped = 0

    # -- writing ---------------------------------------------------------------------------
    def pack_missing(self, objects: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``objects`` with the raw chunks the store lacks compressed into packs; call before
        the write transaction that stores them. Chunks found present stay as they are:
        ``put_objects`` must still see them, to protect them from a running collection and
        to store them after all if a sweep took them meanwhile."""
        unpacked = TYPE_CHUNK + _UNPACKED
        present = set()
        with self.db.read() as txn:
            for oid, value in objects:
                if value[:2] == unpacked:
                    found = txn.get(oid, db=self.objects)
                    if found is not None:
                        present.add(oid)
                    self._count_mapped(len(found) if found is not None else 0)
        return pack_unpacked([o for o in objects if o[0] not in present], parallel=True) + [
            o for o in objects if o[0] in present
        ]

    def put_objects(self, txn: lmdb.Transaction, objects: Iterable[tuple[bytes, bytes]]) -> int:
        """Store objects not yet present; raw chunks go into packs (``pack_missing`` does that
        before the transaction). Packs built outside it are kept only if one of their chunks
        is new here. Returns bytes newly written."""
        objects = list(objects)
        self._note_stored(oid for oid, _ in objects)
        written = 0
        unpacked: list[tuple[bytes, bytes]] = []
        packs: dict[bytes, bytes] = {}
        needed: set[bytes] = set()
        for oid, value in objects:
            # every lookup maps pages (the value found, and a freshly written value's whole
            # large folio): released as the transaction goes, not only after it commits
            head = value[:2]
            if head == TYPE_CHUNK + _UNPACKED:
                found = txn.get(oid, db=self.objects)
                self._count_mapped(len(found) if found is not None else 0)
                if found is None:
                    unpacked.append((oid, value))
            elif value[:1] == TYPE_PACK:
                packs[oid] = value
            else:
                self._count_mapped(0)  # at least a page of the tree, at most a folio
                if txn.put(oid, value, db=self.objects, overwrite=False):
                    written += len(value)
                    if head == TYPE_CHUNK + _PACKED:
                        needed.add(_POINTER.unpack_from(value, 2)[0])
        for pack_id in needed & packs.keys():
            if txn.put(pack_id, packs[pack_id], db=self.objects, overwrite=False):
                written += len(packs[pack_id])
        # raw chunks still missing here (a caller that did not pack them, or a sweep that took
        # them after pack_missing found them present)
        for oid, value in pack_unpacked(unpacked):
            if txn.put(oid, value, db=self.objects, overwrite=False):
                written += len(value)
        if written >= RELEASE_AFTER_WRITE_BYTES or len(objects) >= RELEASE_AFTER_OBJECTS:
            self.db.release_after_commit()  # what the transaction touched stays mapped
        return written

    # -- protection from a running collection (collector.py) -------------------------------
    def protect(self) -> None:
        """From now on remember every object stored, new or already present, until
        ``unprotect``: a collection cycle must not delete what was stored after its start."""
        with self._protect_lock:
            self._protected = set()

    def protected_among(self, ids: set[bytes]) -> set[bytes]:
        """Which of ``ids`` were stored since ``protect`` (call from inside a write
        transaction: stores happen in write transactions, which all run on one thread, so
        none is half-done meanwhile)."""
        with self._protect_lock:
            if self._protected is None:
                return set()
            small, big = sorted((ids, self._protected), key=len)
            return {oid for oid in small if oid in big}

    def unprotect(self) -> None:
        with self._protect_lock:
            self._protected = None

    def _note_stored(self, ids: Iterable[bytes]) -> None:
        with self._protect_lock:
            if self._protected is not None:
                self._protected.update(ids)

    def iter_object_ids(self, txn: lmdb.Transaction) -> Iterator[bytes]:
        cur = txn.cursor(db=self.objects)
        for key in cur.iternext(keys=True, values=False):
            yield bytes(key)

    # -- reading ---------------------------------------------------------------------------
    def get(self, oid: bytes, txn: lmdb.Transaction | None = None) -> bytes:
        """An object's stored value."""
        value = self.find(oid, txn)
        if value is None:
            raise StoreIOError(f"object {oid.hex()} is missing from the store")
        self._count_mapped(len(value))
        return value

    def kind_and_payload(self, oid: bytes) -> tuple[bytes, bytes]:
        """An object's kind and payload (what its id is the hash of), whatever form it is
        stored in: the form objects travel to a remote in."""
        value = self.get(oid)
        kind = value[:1]
        if kind == TYPE_CHUNK:
            return kind, self._chunk_data(oid, value)
        if kind == TYPE_TREE:
            return kind, bytes(stored_payload(value))
        if kind == TYPE_LIST:
            return kind, value[1:]
        raise StoreIOError(f"object {oid.hex()} of type {kind!r} is no file or tree object")

    def find(self, oid: bytes, txn: lmdb.Transaction | None = None) -> bytes | None:
        """An object's stored value, or None if the store has no such object."""
        if txn is None:
            with self.db.read() as rtxn:
                return rtxn.get(oid, db=self.objects)
        return txn.get(oid, db=self.objects)

    def _count_mapped(self, nbytes: int) -> None:
        """Count bytes read through LMDB's map, and have its pages released every
        ``MAP_RELEASE_BYTES``: streaming a big file through the store must not leave the
        whole file mapped in the daemon (``MetaDB.release_mapped_pages``)."""
        with self._cache_lock:
            self._mapped += max(nbytes, MAPPED_PER_TOUCH)
            due = self._mapped >= MAP_RELEASE_BYTES
            if due:
                self._mapped = 0
        if due:
            self.db.release_mapped_pages()

    def _cached(self, oid: bytes) -> bytes | None:
        with self._cache_lock:
            hit = self._cache.get(oid)
            if hit is not None:
                self._cache.move_to_end(oid)
            return hit

    def _remember(self, oid: bytes, data: bytes) -> None:
        with self._cache_lock:
            self._cache[oid] = data
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _payload(self, value: bytes) -> bytes:
        """The plain bytes a chunk or pack value stands for."""
        flag = value[1:2]
        if flag == _ZSTD:
            return decompress(value[2:])
        if flag in (_RAW, _UNPACKED):
            return value[2:]
        if flag == _PACKED and value[:1] == TYPE_CHUNK:
            pack_id, offset, length = _POINTER.unpack_from(value, 2)
            pack = self._cached(pack_id)
            if pack is None:
                pack = self._payload(self.get(pack_id))
                self._remember(pack_id, pack)
            return pack[offset : offset + length]
        raise StoreIOError(f"stored value with unknown encoding {flag!r}")

    def _chunk_data(self, oid: bytes, value: bytes | None = None) -> bytes:
        hit = self._cached(oid)
        if hit is not None:
            return hit
        if value is None:
            value = self.get(oid)
        if value[:1] != TYPE_CHUNK:
            raise StoreIOError(f"object {oid.hex()} is not a chunk")
        data = self._payload(value)
        if value[1:2] != _PACKED:  # packed chunks are slices of a cached pack already
            self._remember(oid, data)
        return data

    def _cached_listing(self, content_id: bytes) -> _Listing | None:
        with self._cache_lock:
            hit = self._listings.get(content_id)
            if hit is not None:
                self._listings.move_to_end(content_id)
            return hit

    def _remember_listing(self, content_id: bytes, listing: _Listing) -> None:
        with self._cache_lock:
            self._listings[content_id] = listing
            if len(self._listings) > LISTINGS_CACHED:
                self._listings.popitem(last=False)

    def kind_of(self, oid: bytes) -> bytes:
        """An object's kind (``TYPE_TREE``, ``TYPE_LIST``, ...)."""
        return self.get(oid)[:1]

    def content_size(self, content_id: bytes) -> int:
        """How many bytes a file's content holds (``b""``: none), from its stored object: a
        packed chunk's pointer, a chunk list's items; EIO for an object of no file content."""
        if not content_id:
            return 0
        value = self.get(content_id)
        if value[:2] == TYPE_CHUNK + _PACKED:
            return int(_POINTER.unpack_from(value, 2)[2])
        if value[:1] == TYPE_CHUNK:
            return len(self._chunk_data(content_id, value))
        try:
            return content_size(value[:1], value[1:])
        except StoreIOError:
            raise StoreIOError(f"object {content_id.hex()} is not file content") from None

    def read(self, content_id: bytes, offset: int = 0, size: int = -1) -> bytes:
        """Bytes ``[offset, offset+size)`` of a file's content (``size=-1``: to the end; for
        small content only: a caller of a big file's whole content takes ``pieces``)."""
        return b"".join(
            piece if isinstance(piece, bytes) else bytes(piece)
            for piece in self.pieces(content_id, offset, size)
        )

    def pieces(self, content_id: bytes, offset: int = 0, size: int = -1) -> Iterator[Piece]:
        """Bytes ``[offset, offset+size)`` of a file's content as a stream: its chunks (or
        their parts) as bytes, its holes as ints, one chunk in memory at a time."""
        if not content_id or size == 0:
            return
        # a big file's list is megabytes: read once, not at every read of the file
        listing = self._cached_listing(content_id)
        if listing is None:
            value = self.get(content_id)
            if value[:1] == TYPE_CHUNK:
                data = self._chunk_data(content_id, value)
                yield data[offset:] if size < 0 else data[offset : offset + size]
                return
            if value[:1] != TYPE_LIST:
                raise StoreIOError(f"object {content_id.hex()} is not file content")
            listing = _Listing(memoryview(value)[1:])
            self._remember_listing(content_id, listing)
        end = listing.size if size < 0 else min(listing.size, offset + size)
        for oid, start, length in listing.items_from(offset):
            if start >= end:
                return
            lo, hi = max(0, offset - start), min(length, end - start)
            if oid == HOLE_ID:
                yield hi - lo
            else:
                data = self._chunk_data(oid)
                yield data[lo:hi] if (lo, hi) != (0, length) else data

    def verify(self, oid: bytes, value: bytes) -> bool:
        """Does the stored value hash to its id? (fsck; a frame that does not decompress
        does not)"""
        kind = value[:1]
        try:
            if kind in (TYPE_CHUNK, TYPE_PACK):
                return object_id(kind, self._payload(value)) == oid
            if kind == TYPE_TREE:
                return object_id(kind, stored_payload(value)) == oid
        except StoreIOError:
            return False
        return object_id(kind, value[1:]) == oid
