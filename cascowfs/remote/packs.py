"""The remote's packs and indexes: how objects travel, and how they are verified.

An object travels as its kind (``C`` chunk, ``L`` chunk list, ``T`` tree) and its payload,
the bytes its id is the BLAKE3 of (``codec.object_id``), whatever form the store keeps it
in. A pack is many objects in one zstd frame (a few MiB to tens of MiB: object stores
charge per request); its index lists the objects it holds. Both are named by the BLAKE3
of their own bytes, so a reader checks every download against its name, and every object
in it against its id: a corrupted or truncated object is an error naming it, never a
wrong tree. docs/remotes.md has the byte layout.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from ..codec import TYPE_CHUNK, TYPE_LIST, TYPE_TREE, compress, decompress, object_id
from ..errors import StoreIOError

PACK_MAGIC = b"CASCOWPK\x01"
INDEX_MAGIC = b"CASCOWIX\x01"
_ENTRY = struct.Struct("<c32sI")  # kind, id, payload length
_INDEX_HEAD = struct.Struct("<32sQ")  # pack name, pack size
KINDS = (TYPE_CHUNK, TYPE_LIST, TYPE_TREE)
# A pack is sent once its objects (payloads and entry heads) reach this size: big enough that
# requests cost little beside the bytes, small enough that an interrupted push re-sends little.
PACK_TARGET = 16 << 20
# The largest object a remote takes. The format allows 4 GiB - 1 (a u32 length), no object of
# a store comes near: a chunk is at most 256 KiB, a directory page 128 entries, and a chunk
# list 36 bytes a chunk (64 MiB: a file of about 120 GB at the average chunk size).
OBJECT_MAX = 64 << 20
# What a pack or an index may hold once decompressed (the bound of every read): a pack is
# sealed when its objects reach PACK_TARGET, so it holds less than that before its last one.
PACK_BODY_MAX = PACK_TARGET + _ENTRY.size + OBJECT_MAX
INDEX_BODY_MAX = _INDEX_HEAD.size + PACK_TARGET + _ENTRY.size
_NAME_DIGITS = frozenset("0123456789abcdef")


def is_name(name: str) -> bool:
    """Whether ``name`` is a pack's or an index's name: the 64 lowercase hex digits of a
    BLAKE3 hash (a listing's other keys are no pack or index, and name no file to write)."""
    return len(name) == 64 and _NAME_DIGITS.issuperset(name)


def name_of(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def pack_key(name: str) -> str:
    return f"packs/{name}"


def index_key(name: str) -> str:
    return f"index/{name}"


@dataclass(frozen=True)
class IndexEntry:
    kind: bytes
    oid: bytes
    length: int


@dataclass(frozen=True)
class PackIndex:
    name: str  # the index's own name
    pack: str  # the name of the pack it describes
    pack_size: int
    entries: list[IndexEntry]

    @property
    def body_size(self) -> int:
        """The bytes the pack's frame holds, as this index describes it."""
        return sum(_ENTRY.size + entry.length for entry in self.entries)


class PackBuilder:
    """Objects gathered for one pack, in the order they came."""

    def __init__(self) -> None:
        self.entries: list[IndexEntry] = []
        self._body: list[bytes] = []
        self.body_bytes = 0  # the pack's frame so far: entry heads and payloads

    def add(self, kind: bytes, oid: bytes, payload: bytes) -> None:
        self.entries.append(IndexEntry(kind, oid, len(payload)))
        self._body.append(_ENTRY.pack(kind, oid, len(payload)))
        self._body.append(payload)
        self.body_bytes += _ENTRY.size + len(payload)

    def __len__(self) -> int:
        return len(self.entries)

    def seal(self) -> tuple[str, bytes, str, bytes]:
        """The pack's name and bytes, then its index's name and bytes."""
        pack = PACK_MAGIC + compress(b"".join(self._body))
        pack_name = name_of(pack)
        index = INDEX_MAGIC + compress(
            _INDEX_HEAD.pack(bytes.fromhex(pack_name), len(pack))
            + b"".join(_ENTRY.pack(e.kind, e.oid, e.length) for e in self.entries)
        )
        return pack_name, pack, name_of(index), index


def _check_name(data: bytes, name: str, what: str, where: str) -> None:
    if name_of(data) != name:
        raise StoreIOError(
            f"remote {where}: {what} is corrupt or truncated ({len(data)} bytes that do not "
            "hash to its name)"
        )


def _body(data: bytes, magic: bytes, limit: int, key: str, where: str) -> bytes:
    if not data.startswith(magic):
        kind = "index" if magic == INDEX_MAGIC else "pack"
        raise StoreIOError(f"remote {where}: {key} is not a cascowfs {kind}")
    try:
        return decompress(memoryview(data)[len(magic) :], limit)
    except StoreIOError as exc:
        raise StoreIOError(f"remote {where}: {key}: {exc.message}") from None


def read_index(data: bytes, name: str, where: str) -> PackIndex:
    """The index ``data`` of name ``name``, checked against its name and held to what a push
    writes: objects of a known kind, none over ``OBJECT_MAX``, a pack of at most
    ``PACK_BODY_MAX`` bytes decompressed."""
    key = index_key(name)
    _check_name(data, name, key, where)
    body = _body(data, INDEX_MAGIC, INDEX_BODY_MAX, key, where)
    if len(body) < _INDEX_HEAD.size or (len(body) - _INDEX_HEAD.size) % _ENTRY.size:
        raise StoreIOError(f"remote {where}: {key} is truncated")
    pack, size = _INDEX_HEAD.unpack_from(body)
    entries = [
        IndexEntry(kind, oid, length)
        for kind, oid, length in _ENTRY.iter_unpack(memoryview(body)[_INDEX_HEAD.size :])
    ]
    index = PackIndex(name, pack.hex(), size, entries)
    for entry in entries:
        if entry.kind not in KINDS or entry.length > OBJECT_MAX:
            raise StoreIOError(
                f"remote {where}: {key} names object {entry.oid.hex()} of kind {entry.kind!r} "
                f"and {entry.length} bytes, which no push sends"
            )
    if index.body_size > PACK_BODY_MAX:
        raise StoreIOError(
            f"remote {where}: {key} describes a pack of {index.body_size} bytes, more than the "
            f"{PACK_BODY_MAX} a push sends"
        )
    return index


def read_pack(
    data: bytes, name: str, where: str, body_size: int = PACK_BODY_MAX
) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(kind, id, payload) of every object of a pack, each verified against its id; the pack
    may hold no more than ``body_size`` bytes decompressed (what its index describes)."""
    key = pack_key(name)
    _check_name(data, name, key, where)
    body = memoryview(_body(data, PACK_MAGIC, min(body_size, PACK_BODY_MAX), key, where))
    pos = 0
    while pos < len(body):
        if pos + _ENTRY.size > len(body):
            raise StoreIOError(f"remote {where}: {key} is truncated")
        kind, oid, length = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        payload = bytes(body[pos : pos + length])
        pos += length
        if kind not in KINDS or len(payload) != length or object_id(kind, payload) != oid:
            raise StoreIOError(f"remote {where}: object {oid.hex()} in {key} does not match its id")
        yield kind, oid, payload
