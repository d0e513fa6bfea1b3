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
# A pack is sent once its payloads reach this size: big enough that requests cost little
# beside the bytes, small enough that an interrupted push re-sends little.
PACK_TARGET = 16 << 20


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


class PackBuilder:
    """Objects gathered for one pack, in the order they came."""

    def __init__(self) -> None:
        self.entries: list[IndexEntry] = []
        self._body: list[bytes] = []
        self.payload_bytes = 0

    def add(self, kind: bytes, oid: bytes, payload: bytes) -> None:
        self.entries.append(IndexEntry(kind, oid, len(payload)))
        self._body.append(_ENTRY.pack(kind, oid, len(payload)))
        self._body.append(payload)
        self.payload_bytes += len(payload)

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


def read_index(data: bytes, name: str, where: str) -> PackIndex:
    key = index_key(name)
    _check_name(data, name, key, where)
    if not data.startswith(INDEX_MAGIC):
        raise StoreIOError(f"remote {where}: {key} is not a cascowfs index")
    body = decompress(data[len(INDEX_MAGIC) :])
    if (len(body) - _INDEX_HEAD.size) % _ENTRY.size:
        raise StoreIOError(f"remote {where}: {key} is truncated")
    pack, size = _INDEX_HEAD.unpack_from(body)
    entries = [
        IndexEntry(kind, oid, length)
        for kind, oid, length in _ENTRY.iter_unpack(memoryview(body)[_INDEX_HEAD.size :])
    ]
    return PackIndex(name, pack.hex(), size, entries)


def read_pack(data: bytes, name: str, where: str) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(kind, id, payload) of every object of a pack, each verified against its id."""
    key = pack_key(name)
    _check_name(data, name, key, where)
    if not data.startswith(PACK_MAGIC):
        raise StoreIOError(f"remote {where}: {key} is not a cascowfs pack")
    body = memoryview(decompress(data[len(PACK_MAGIC) :]))
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
