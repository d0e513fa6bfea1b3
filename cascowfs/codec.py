"""Object ids and zstd frames: what every kind of stored object shares.

An id is BLAKE3-256 over a one-letter domain prefix (the object's kind) and the payload, so a
file chunk can never alias a tree object even when an untrusted branch writes a file whose
bytes are a tree encoding. ``cas.py`` (chunks, chunk lists, packs) and ``trees.py``
(directories) both build on this module.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from .errors import StoreIOError

ID_SIZE = 32
ZSTD_LEVEL = 3  # see docs/architecture.md ("Decisions and why")
# An import's packs: most of a store's bytes, written while the import waits for them
IMPORT_ZSTD_LEVEL = 1

TYPE_CHUNK = b"C"
TYPE_PACK = b"K"
TYPE_LIST = b"L"
TYPE_TREE = b"T"


def object_id(kind: bytes, payload: bytes | memoryview) -> bytes:
    hasher = blake3.blake3(kind + b"\0")
    hasher.update(payload)
    return hasher.digest()


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    comps = getattr(_local, "comps", None)
    if comps is None:
        comps = _local.comps = {}
    comp = comps.get(level)
    if comp is None:
        comp = comps[level] = zstandard.ZstdCompressor(level=level)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def compress(data: bytes | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """A zstd frame of ``data`` at the store's level, or ``level`` (this thread's
    compressor)."""
    return _compressor(level).compress(data)


def decompress(frame: bytes | memoryview, limit: int | None = None) -> bytes:
    """The bytes of a zstd frame. With ``limit``, a frame that declares more than ``limit``
    bytes, or holds more without declaring its size, is StoreIOError before anything is
    allocated for it: a frame of a few KiB can declare gigabytes, and zstd allocates what the
    frame declares."""
    try:
        if limit is None:
            return _decompressor().decompress(frame)
        declared = zstandard.frame_content_size(frame)
        if declared > limit:
            raise StoreIOError(
                f"a zstd frame that declares {declared} bytes, more than the {limit} it may hold"
            )
        if declared >= 0:
            return _decompressor().decompress(frame)
        return _decompressor().decompress(frame, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise StoreIOError(f"a stored object does not decompress: {exc}") from None
