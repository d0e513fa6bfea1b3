"""Content-addressed object store: chunks, chunk lists and trees, with refcounts.

Ids are BLAKE3-256 over a one-letter domain prefix and the payload, so a file chunk can never
alias a tree object even when an untrusted branch writes a file whose bytes are a tree encoding.

Objects form a DAG (tree -> tree | content; chunk list -> chunk). Refcounts count parent
references with multiplicity: the first reference to an object adds one reference to each of its
children; the last one going away removes the object and drops its children in turn. Objects
written before their operation's APPLY step have no refcount entry at all; gc reclaims those.
"""

from __future__ import annotations

import struct
import threading
from collections import Counter, OrderedDict
from typing import Iterable, Iterator

import blake3
import lmdb
import zstandard
from fastcdc import fastcdc

from .errors import StoreIOError
from .metadb import MetaDB

# Chunk sizes: see docs/architecture.md ("Chunking") for the measurement behind them.
CHUNK_MIN = 16 * 1024
CHUNK_AVG = 64 * 1024
CHUNK_MAX = 256 * 1024
ZSTD_LEVEL = 3  # see docs/architecture.md ("Compression")

TYPE_CHUNK = b"C"
TYPE_PACK = b"K"
TYPE_LIST = b"L"
TYPE_TREE = b"T"

# second byte of a chunk's stored value
_RAW = b"\x00"       # the data itself
_ZSTD = b"\x01"      # zstd frame
_PACKED = b"\x02"    # pointer: pack id, offset, length (the data lives in a pack object)
_UNPACKED = b"\x03"  # small raw chunk on its way into a pack; never stored as such
_POINTER = struct.Struct("<32sII")
# Small chunks (most source files are one) are compressed together in packs of about
# PACK_TARGET bytes: measured on CPython's sources, 42k files below 16 KiB take 64 MB in LMDB
# pages compressed one by one and 35 MB packed (overflow pages round every value above
# ~2 KiB up to 4 KiB, and zstd finds more to share across files).
PACK_MAX_CHUNK = 16 * 1024
PACK_TARGET = 256 * 1024
_LIST_ITEM = struct.Struct("<32sI")
_REF = struct.Struct("<Q")
_INCREF = b"+"
_DECREF = b"-"
_SEQ_KEY = 8  # key length of store format 3's queue (a u64 sequence number)

ID_SIZE = 32


def object_id(kind: bytes, payload: bytes | memoryview) -> bytes:
    hasher = blake3.blake3(kind + b"\0")
    hasher.update(payload)
    return hasher.digest()


def split_chunks(data: bytes) -> list[memoryview]:
    """Content-defined chunk boundaries (FastCDC, Cython path)."""
    if len(data) <= CHUNK_MIN:
        return [memoryview(data)]
    view = memoryview(data)
    return [view[c.offset:c.offset + c.length]
            for c in fastcdc(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX, fat=False)]


class PreparedContent:
    """A file's content cut, hashed and compressed, ready to be written in a transaction."""

    __slots__ = ("content_id", "size", "objects")

    def __init__(self, content_id: bytes, size: int, objects: list[tuple[bytes, bytes]]) -> None:
        self.content_id = content_id
        self.size = size
        self.objects = objects  # (id, stored value) for every chunk and the list, if any


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "comp", None)
    if comp is None:
        comp = _local.comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def _chunk_value(chunk: memoryview) -> bytes:
    packed = _compressor().compress(chunk)
    if len(packed) < len(chunk):
        return TYPE_CHUNK + _ZSTD + packed
    return TYPE_CHUNK + _RAW + bytes(chunk)


def prepare_content(data: bytes) -> PreparedContent:
    """Cut ``data`` into chunks and build the objects that store it. Empty data has id b""."""
    if not data:
        return PreparedContent(b"", 0, [])
    pieces = split_chunks(data)
    objects = [(object_id(TYPE_CHUNK, p),
                TYPE_CHUNK + _UNPACKED + bytes(p) if len(p) <= PACK_MAX_CHUNK else _chunk_value(p))
               for p in pieces]
    if len(objects) == 1:
        return PreparedContent(objects[0][0], len(data), objects)
    listing = b"".join(_LIST_ITEM.pack(oid, len(p)) for (oid, _), p in zip(objects, pieces))
    list_id = object_id(TYPE_LIST, listing)
    objects.append((list_id, TYPE_LIST + listing))
    return PreparedContent(list_id, len(data), objects)


def build_pack(chunks: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """One pack holding ``chunks`` (id, raw data): the pack object, then a pointer per chunk."""
    raw = b"".join(data for _, data in chunks)
    pack_id = object_id(TYPE_PACK, raw)
    packed = _compressor().compress(raw)
    objects = [(pack_id, TYPE_PACK + (_ZSTD + packed if len(packed) < len(raw) else _RAW + raw))]
    offset = 0
    for oid, data in chunks:
        objects.append((oid, TYPE_CHUNK + _PACKED + _POINTER.pack(pack_id, offset, len(data))))
        offset += len(data)
    return objects


def pack_unpacked(objects: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Turn the small raw chunks among ``objects`` into packs and pointers (import workers do
    this, so the compression happens in parallel and far fewer bytes cross the pipe)."""
    out, small, seen, size = [], [], set(), 0
    for oid, value in objects:
        if value[:2] != TYPE_CHUNK + _UNPACKED:
            out.append((oid, value))
        elif oid not in seen:
            seen.add(oid)
            small.append((oid, value[2:]))
            size += len(value) - 2
            if size >= PACK_TARGET:
                out.extend(build_pack(small))
                small, size = [], 0
    if small:
        out.extend(build_pack(small))
    return out


def identify_content(data: bytes) -> PreparedContent:
    """Only the content id of ``data`` (no compression, no objects): for status and diff."""
    if not data:
        return PreparedContent(b"", 0, [])
    pieces = split_chunks(data)
    ids = [object_id(TYPE_CHUNK, p) for p in pieces]
    if len(ids) == 1:
        return PreparedContent(ids[0], len(data), [])
    listing = b"".join(_LIST_ITEM.pack(oid, len(p)) for oid, p in zip(ids, pieces))
    return PreparedContent(object_id(TYPE_LIST, listing), len(data), [])


def children_of(value: bytes) -> list[bytes]:
    """Ids an object references (with multiplicity), from its stored value."""
    kind = value[:1]
    if kind == TYPE_CHUNK:
        return [_POINTER.unpack_from(value, 2)[0]] if value[1:2] == _PACKED else []
    if kind == TYPE_PACK:
        return []
    if kind == TYPE_LIST:
        body = memoryview(value)[1:]
        return [bytes(body[i:i + ID_SIZE]) for i in range(0, len(body), _LIST_ITEM.size)]
    if kind == TYPE_TREE:
        from .trees import tree_children  # trees build on this module, not the other way round

        return tree_children(memoryview(value)[1:])
    raise StoreIOError(f"object of unknown type {kind!r}")


class ContentStore:
    """Objects and refcounts in LMDB; chunk reads with a small decompressed-chunk cache."""

    def __init__(self, db: MetaDB, cache_chunks: int = 256) -> None:
        self.db = db
        self.objects = db.db("objects")
        self.refs = db.db("refs")
        self.deferred = db.db("deferred")
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_size = cache_chunks
        self._cache_lock = threading.Lock()

    # -- writing ---------------------------------------------------------------------------
    def put_objects(self, txn: lmdb.Transaction, objects: Iterable[tuple[bytes, bytes]]) -> int:
        """Store objects not yet present (no refcount change); small chunks go into packs.
        Packs built elsewhere (by import workers) are kept only if one of their chunks is new
        here. Returns bytes newly written."""
        written = 0
        small: list[tuple[bytes, bytes]] = []
        packs: dict[bytes, bytes] = {}
        needed: set[bytes] = set()
        for oid, value in objects:
            head = value[:2]
            if head == TYPE_CHUNK + _UNPACKED:
                if txn.get(oid, db=self.objects) is None:
                    small.append((oid, value[2:]))
            elif value[:1] == TYPE_PACK:
                packs[oid] = value
            elif txn.put(oid, value, db=self.objects, overwrite=False):
                written += len(value)
                if head == TYPE_CHUNK + _PACKED:
                    needed.add(_POINTER.unpack_from(value, 2)[0])
        for pack_id in needed & packs.keys():
            if txn.put(pack_id, packs[pack_id], db=self.objects, overwrite=False):
                written += len(packs[pack_id])
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        for item in small:
            batch.append(item)
            size += len(item[1])
            if size >= PACK_TARGET:
                written += self._put_pack(txn, batch)
                batch, size = [], 0
        if batch:
            written += self._put_pack(txn, batch)
        return written

    def _put_pack(self, txn: lmdb.Transaction, chunks: list[tuple[bytes, bytes]]) -> int:
        written = 0
        for oid, value in build_pack(chunks):
            if txn.put(oid, value, db=self.objects, overwrite=False):
                written += len(value)
        return written

    # -- refcounts -------------------------------------------------------------------------
    def refcount(self, txn: lmdb.Transaction, oid: bytes) -> int:
        raw = txn.get(oid, db=self.refs)
        return _REF.unpack(raw)[0] if raw else 0

    def incref(self, txn: lmdb.Transaction, oid: bytes) -> None:
        """Add one reference; an object's first one adds one to each of its children."""
        self._cascade(txn, _INCREF, Counter({oid: 1}), None)

    def decref(self, txn: lmdb.Transaction, oid: bytes) -> int:
        """Drop one reference; objects reaching zero are deleted with their children's refs.
        Returns the number of objects deleted."""
        return self._cascade(txn, _DECREF, Counter({oid: 1}), None)[1]

    # -- deferred refcount changes ----------------------------------------------------------
    # A new root's first reference cascades over every child of every new directory: for a
    # 3-file edit of the linux tree that is ~1,100 refcount updates on random LMDB pages
    # (~3 MB to write and sync), and a prune's last reference the same. Operations therefore
    # only queue their refcount changes (one small record, in their own transaction), and a
    # thread of the StateManager applies the queue later, a bounded slice per transaction, so
    # that no operation waits long behind it for LMDB's one writer. The queue is keyed by
    # sign and object, so changes to one object sum while they wait.
    def defer_incref(self, txn: lmdb.Transaction, oid: bytes) -> None:
        self._defer(txn, _INCREF, oid, 1)

    def defer_decref(self, txn: lmdb.Transaction, oid: bytes) -> None:
        self._defer(txn, _DECREF, oid, 1)

    def _defer(self, txn: lmdb.Transaction, sign: bytes, oid: bytes, n: int) -> None:
        key = sign + oid
        raw = txn.get(key, db=self.deferred)
        txn.put(key, _REF.pack((_REF.unpack(raw)[0] if raw else 0) + n), db=self.deferred)

    def rekey_sequenced_queue(self, txn: lmdb.Transaction) -> None:
        """Store format 3 queued changes by arrival (u64 sequence -> sign + id): key them by
        object instead, summing repeats."""
        old = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.deferred) if len(k) == _SEQ_KEY]
        for key, change in old:
            txn.delete(key, db=self.deferred)
            self._defer(txn, change[:1], change[1:], 1)

    def deferred_count(self, txn: lmdb.Transaction) -> int:
        """Objects with a queued change (changes to one object count once)."""
        return txn.stat(self.deferred)["entries"]

    def apply_deferred(self, txn: lmdb.Transaction, budget: int | None = None) -> int:
        """Apply the queued refcount changes: all of them, or (``budget``) about that many
        object updates, leaving the rest queued. Returns the number of objects deleted.

        Increments go first: no decrement is applied while any increment is queued. Only a
        decrement deletes, so an object that a queued increment needs (it existed when the
        increment was queued) still exists when that increment is applied: final counts are
        those of applying every change at its operation's time, however the work is sliced."""
        spent, _, left = self._cascade(txn, _INCREF, self._take(txn, _INCREF, budget), budget)
        self._requeue(txn, _INCREF, left)
        # Each increment taken costs an update, so a slice that finished its increments under
        # budget took every one queued.
        if left or (budget is not None and spent >= budget):
            return 0
        rest = None if budget is None else budget - spent
        _, deleted, left = self._cascade(txn, _DECREF, self._take(txn, _DECREF, rest), rest)
        self._requeue(txn, _DECREF, left)
        return deleted

    def _take(self, txn: lmdb.Transaction, sign: bytes, limit: int | None) -> Counter[bytes]:
        """Remove and return queued changes of one sign (at most ``limit`` objects)."""
        taken: Counter[bytes] = Counter()
        cursor = txn.cursor(db=self.deferred)
        if not cursor.set_range(sign):
            return taken
        while limit is None or len(taken) < limit:
            key = cursor.key()
            if key[:1] != sign:
                break
            taken[bytes(key[1:])] = _REF.unpack(cursor.value())[0]
            if not cursor.delete():  # moves to the next record
                break
        return taken

    def _requeue(self, txn: lmdb.Transaction, sign: bytes, left: Counter[bytes]) -> None:
        for oid, n in left.items():
            self._defer(txn, sign, oid, n)

    def _cascade(self, txn: lmdb.Transaction, sign: bytes, delta: Counter[bytes],
                 budget: int | None) -> tuple[int, int, Counter[bytes]]:
        """Apply changes of one sign and the cascades they start, stopping after ``budget``
        object updates. Returns (updates, objects deleted, changes not yet applied).

        Level by level, with the changes to one object summed first: new roots of one batch
        share most of their children (the same directories along the same paths), so each
        count is read and written once per level, not once per reference."""
        spent = deleted = 0
        while delta:
            below: Counter[bytes] = Counter()
            items = iter(list(delta.items()))
            for oid, n in items:
                if budget is not None and spent >= budget:
                    left = Counter(dict(items))
                    left[oid] += n
                    left.update(below)
                    return spent, deleted, left
                spent += 1
                if sign == _INCREF:
                    self._count_up(txn, oid, n, below)
                else:
                    deleted += self._count_down(txn, oid, n, below)
            delta = below
        return spent, deleted, Counter()

    def _count_up(self, txn: lmdb.Transaction, oid: bytes, n: int, below: Counter[bytes]) -> None:
        count = self.refcount(txn, oid)
        if count == 0:
            value = txn.get(oid, db=self.objects)
            if value is None:
                raise StoreIOError(f"object {oid.hex()} is referenced but missing")
            below.update(children_of(value))
        txn.put(oid, _REF.pack(count + n), db=self.refs)

    def _count_down(self, txn: lmdb.Transaction, oid: bytes, n: int, below: Counter[bytes]) -> int:
        count = self.refcount(txn, oid)
        if count < n:
            raise StoreIOError(f"refcount of {oid.hex()} would go below zero")
        if count > n:
            txn.put(oid, _REF.pack(count - n), db=self.refs)
            return 0
        txn.delete(oid, db=self.refs)
        value = txn.get(oid, db=self.objects)
        if value is None:
            return 0
        below.update(children_of(value))
        txn.delete(oid, db=self.objects)
        return 1

    def iter_refcounts(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, int]]:
        for key, raw in txn.cursor(db=self.refs):
            yield bytes(key), _REF.unpack(raw)[0]

    def iter_object_ids(self, txn: lmdb.Transaction) -> Iterator[bytes]:
        cur = txn.cursor(db=self.objects)
        for key in cur.iternext(keys=True, values=False):
            yield bytes(key)

    # -- reading ---------------------------------------------------------------------------
    def get(self, oid: bytes, txn: lmdb.Transaction | None = None,
            pending: dict[bytes, bytes] | None = None) -> bytes:
        """An object's stored value; ``pending`` holds objects not written yet (a commit
        writing its delta layer before its transaction)."""
        if pending is not None and oid in pending:
            return pending[oid]
        if txn is None:
            with self.db.read() as rtxn:
                value = rtxn.get(oid, db=self.objects)
        else:
            value = txn.get(oid, db=self.objects)
        if value is None:
            raise StoreIOError(f"object {oid.hex()} is missing from the store")
        return value

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

    def _payload(self, value: bytes, pending: dict[bytes, bytes] | None = None) -> bytes:
        """The plain bytes a chunk or pack value stands for."""
        flag = value[1:2]
        if flag == _ZSTD:
            return _decompressor().decompress(value[2:])
        if flag in (_RAW, _UNPACKED):
            return value[2:]
        if flag == _PACKED and value[:1] == TYPE_CHUNK:
            pack_id, offset, length = _POINTER.unpack_from(value, 2)
            pack = self._cached(pack_id)
            if pack is None:
                pack = self._payload(self.get(pack_id, None, pending))
                self._remember(pack_id, pack)
            return pack[offset:offset + length]
        raise StoreIOError(f"stored value with unknown encoding {flag!r}")

    def _chunk_data(self, oid: bytes, value: bytes | None = None,
                    pending: dict[bytes, bytes] | None = None) -> bytes:
        hit = self._cached(oid)
        if hit is not None:
            return hit
        if value is None:
            value = self.get(oid, None, pending)
        if value[:1] != TYPE_CHUNK:
            raise StoreIOError(f"object {oid.hex()} is not a chunk")
        data = self._payload(value, pending)
        if value[1:2] != _PACKED:  # packed chunks are slices of a cached pack already
            self._remember(oid, data)
        return data

    def read(self, content_id: bytes, offset: int = 0, size: int = -1,
             pending: dict[bytes, bytes] | None = None) -> bytes:
        """Bytes ``[offset, offset+size)`` of a file's content (``size=-1``: to the end)."""
        if not content_id:
            return b""
        value = self.get(content_id, None, pending)
        if value[:1] == TYPE_CHUNK:
            data = self._chunk_data(content_id, value)
            return data[offset:] if size < 0 else data[offset:offset + size]
        if value[:1] != TYPE_LIST:
            raise StoreIOError(f"object {content_id.hex()} is not file content")
        out = []
        end = None if size < 0 else offset + size
        pos = 0
        body = memoryview(value)[1:]
        for i in range(0, len(body), _LIST_ITEM.size):
            cid, length = _LIST_ITEM.unpack(body[i:i + _LIST_ITEM.size])
            if end is not None and pos >= end:
                break
            if pos + length > offset:
                data = self._chunk_data(cid, None, pending)
                lo = max(0, offset - pos)
                hi = length if end is None else min(length, end - pos)
                out.append(data[lo:hi])
            pos += length
        return b"".join(out)

    def verify(self, oid: bytes, value: bytes) -> bool:
        """Does the stored value hash to its id? (fsck)"""
        kind = value[:1]
        if kind in (TYPE_CHUNK, TYPE_PACK):
            return object_id(kind, self._payload(value)) == oid
        return object_id(kind, value[1:]) == oid
