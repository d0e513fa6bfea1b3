"""Content-addressed object store: chunks, chunk lists, packs and trees.

Ids and compression are ``codec.py``'s; tree objects are encoded by ``trees.py``, which this
store reads to follow a tree's references and verify it.

Objects form a DAG (tree -> tree | content; chunk list -> chunk; chunk pointer -> pack). What
no live root reaches is deleted by the collector (collector.py), which this store helps by
remembering, while a collection runs, every object stored meanwhile.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import lmdb
from fastcdc import fastcdc

from .codec import (
    ID_SIZE,
    TYPE_CHUNK,
    TYPE_LIST,
    TYPE_PACK,
    TYPE_TREE,
    compress,
    decompress,
    object_id,
)
from .errors import StoreIOError
from .metadb import MetaDB
from .trees import stored_payload, tree_children

# Chunk sizes: bench-results/NOTES.md ("Chunks") has the measurement behind them.
CHUNK_MIN = 16 * 1024
CHUNK_AVG = 64 * 1024
CHUNK_MAX = 256 * 1024

# second byte of a chunk's stored value
_RAW = b"\x00"       # the data itself
_ZSTD = b"\x01"      # zstd frame (chunks stored by versions before every chunk was packed)
_PACKED = b"\x02"    # pointer: pack id, offset, length (the data lives in a pack object)
_UNPACKED = b"\x03"  # raw chunk on its way into a pack; never stored as such
_POINTER = struct.Struct("<32sII")
# Chunks are compressed together in packs of about PACK_TARGET bytes, never one by one: LMDB
# rounds every value above ~2 KiB up to whole 4 KiB overflow pages, and zstd finds more to
# share across chunks (bench-results/NOTES.md, "Packs", has the measurements).
PACK_TARGET = 256 * 1024
_LIST_ITEM = struct.Struct("<32sI")

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


def prepare_content(data: bytes) -> PreparedContent:
    """Cut ``data`` into chunks and build the objects that store it. Empty data has id b""."""
    if not data:
        return PreparedContent(b"", 0, [])
    pieces = split_chunks(data)
    objects = [(object_id(TYPE_CHUNK, p), TYPE_CHUNK + _UNPACKED + bytes(p)) for p in pieces]
    if len(objects) == 1:
        return PreparedContent(objects[0][0], len(data), objects)
    listing = b"".join(_LIST_ITEM.pack(oid, len(p))
                       for (oid, _), p in zip(objects, pieces, strict=True))
    list_id = object_id(TYPE_LIST, listing)
    objects.append((list_id, TYPE_LIST + listing))
    return PreparedContent(list_id, len(data), objects)


def build_pack(chunks: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """One pack holding ``chunks`` (id, raw data): the pack object, then a pointer per chunk."""
    raw = b"".join(data for _, data in chunks)
    pack_id = object_id(TYPE_PACK, raw)
    packed = compress(raw)
    objects = [(pack_id, TYPE_PACK + (_ZSTD + packed if len(packed) < len(raw) else _RAW + raw))]
    offset = 0
    for oid, data in chunks:
        objects.append((oid, TYPE_CHUNK + _PACKED + _POINTER.pack(pack_id, offset, len(data))))
        offset += len(data)
    return objects


def pack_unpacked(objects: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Turn the raw chunks among ``objects`` into packs and pointers (import workers do this,
    so the compression happens in parallel and far fewer bytes cross the pipe; operations do
    it before their write transaction, so compression never holds up LMDB's one writer)."""
    out, raw, seen, size = [], [], set(), 0
    for oid, value in objects:
        if value[:2] != TYPE_CHUNK + _UNPACKED:
            out.append((oid, value))
        elif oid not in seen:
            seen.add(oid)
            raw.append((oid, value[2:]))
            size += len(value) - 2
            if size >= PACK_TARGET:
                out.extend(build_pack(raw))
                raw, size = [], 0
    if raw:
        out.extend(build_pack(raw))
    return out


def identify_content(data: bytes) -> PreparedContent:
    """Only the content id of ``data`` (no compression, no objects): for status and diff."""
    if not data:
        return PreparedContent(b"", 0, [])
    pieces = split_chunks(data)
    ids = [object_id(TYPE_CHUNK, p) for p in pieces]
    if len(ids) == 1:
        return PreparedContent(ids[0], len(data), [])
    listing = b"".join(_LIST_ITEM.pack(oid, len(p)) for oid, p in zip(ids, pieces, strict=True))
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
        return tree_children(stored_payload(value))
    raise StoreIOError(f"object of unknown type {kind!r}")


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

    # -- writing ---------------------------------------------------------------------------
    def pack_missing(self, objects: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``objects`` with the raw chunks the store lacks compressed into packs; call before
        the write transaction that stores them. Chunks found present stay as they are:
        ``put_objects`` must still see them, to protect them from a running collection and
        to store them after all if a sweep took them meanwhile."""
        unpacked = TYPE_CHUNK + _UNPACKED
        with self.db.read() as txn:
            present = {oid for oid, value in objects
                       if value[:2] == unpacked and txn.get(oid, db=self.objects) is not None}
        return (pack_unpacked([o for o in objects if o[0] not in present])
                + [o for o in objects if o[0] in present])

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
            head = value[:2]
            if head == TYPE_CHUNK + _UNPACKED:
                if txn.get(oid, db=self.objects) is None:
                    unpacked.append((oid, value))
            elif value[:1] == TYPE_PACK:
                packs[oid] = value
            elif txn.put(oid, value, db=self.objects, overwrite=False):
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
        return value

    def find(self, oid: bytes, txn: lmdb.Transaction | None = None) -> bytes | None:
        """An object's stored value, or None if the store has no such object."""
        if txn is None:
            with self.db.read() as rtxn:
                return rtxn.get(oid, db=self.objects)
        return txn.get(oid, db=self.objects)

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
            return pack[offset:offset + length]
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

    def read(self, content_id: bytes, offset: int = 0, size: int = -1) -> bytes:
        """Bytes ``[offset, offset+size)`` of a file's content (``size=-1``: to the end)."""
        if not content_id:
            return b""
        value = self.get(content_id)
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
                data = self._chunk_data(cid)
                lo = max(0, offset - pos)
                hi = length if end is None else min(length, end - pos)
                out.append(data[lo:hi])
            pos += length
        return b"".join(out)

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
