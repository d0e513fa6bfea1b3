"""Snapshot trees: content-addressed directory objects (a Merkle tree).

A directory is one object listing its entries sorted by name; its id is the BLAKE3 of that
encoding, so two snapshots share every unchanged subtree, a commit writes only the changed
paths and their ancestors, diff skips equal ids, and the root id is the snapshot's digest.

A large directory is split into pages (each a listing in the same format) under an index
object that names them in order. Page boundaries depend only on the names (an entry closes
its page when a hash of its name says so), so one changed entry makes one new page and a new
index, not a new copy of the whole listing: a commit that touches one file in a directory of
1,100 entries writes and counts ~40 entries instead of 1,100.
"""

from __future__ import annotations

import stat
import struct
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import lmdb
import xxhash

from .codec import ID_SIZE, TYPE_TREE, compress, decompress, object_id
from .errors import StoreIOError
from .model import Change, Entry

if TYPE_CHECKING:  # a TreeStore reads through a ContentStore, which decodes trees with this module
    from .cas import ContentStore

FORMAT_VERSION = 2  # 2: directory entries carry tree_links
INDEX_VERSION = 3  # an index of a paged directory: its pages' ids, in name order
# First byte of a stored tree payload that is a zstd frame of the payload (listing or index);
# no FORMAT_VERSION or INDEX_VERSION may take this value.
# A tree's id is always that of the plain payload. Listings shrink ~2.4x (linux-source's take
# 12.3 MB of LMDB plain and 5.1 MB compressed), mostly under LMDB's ~2 KiB threshold, above
# which a value takes whole 4 KiB overflow pages.
COMPRESSED = 4
_COMPRESSED_MARK = bytes([COMPRESSED])
COMPRESS_ABOVE = 128  # bytes of payload; smaller listings gain nothing
PAGED_ABOVE = 64  # directories with more entries than this are split into pages
PAGE_AVERAGE = 32  # an entry closes its page when the hash of its name is 0 modulo this
PAGE_MAX = 128  # ... or when the page is this full
# A paged directory of at most this many pages (some 256 entries, about a millisecond to
# decode) is quick enough for a caller that must not wait (``TreeStore.get_quick``).
QUICK_PAGES = 8
# Entries the tree cache keeps, over all its trees (a few hundred bytes each): a count of
# trees alone let a few directories of a million entries hold gigabytes.
CACHED_ENTRIES = 1 << 19
_FIXED = struct.Struct("<IIIqQQQQQ")  # mode uid gid mtime_ns size rdev tree_files/bytes/links
_HEAD = struct.Struct(_FIXED.format + "H")  # _FIXED, then the length of the ref after it
_NO_LINK_NO_XATTRS = bytes(4)  # the lengths of an empty link and of no xattrs: most entries
_new_entry = tuple.__new__  # Entry(...) without its argument handling: decoding makes many
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

ROOT_NAME = b""
# In place of an object's value in an encoding's object list: the object is in the store
# already (a page reused from a stored listing), so nothing is written for it. A commit takes
# such pages from its branch's base tree, which keeps them alive as it keeps every unchanged
# subtree the commit names.
STORED = b""


def counted(entry: Entry) -> tuple[int, int, int]:
    """What an entry adds to its directory's totals (``tree_files``, ``tree_bytes``,
    ``tree_links``): a directory entry carries those of the tree it names."""
    linked = 1 if entry.link else 0
    if entry.is_dir:
        return entry.tree_files, entry.tree_bytes, entry.tree_links + linked
    if entry.is_file:
        return 1, entry.size, linked
    return 0, 0, linked


def listing_totals(entries: Iterable[Entry]) -> tuple[int, int, int]:
    """The totals a directory entry naming a tree of ``entries`` carries (``counted``)."""
    files = total = links = 0
    for entry in entries:
        f, b, n = counted(entry)
        files, total, links = files + f, total + b, links + n
    return files, total, links


def encode_tree(entries: dict[bytes, Entry]) -> bytes:
    out = [bytes([FORMAT_VERSION])]
    append = out.append
    for name in sorted(entries):
        _, mode, uid, gid, mtime_ns, size, ref, rdev, xattrs, link, files, total, links = entries[
            name
        ]
        append(_U16.pack(len(name)))
        append(name)
        append(_HEAD.pack(mode, uid, gid, mtime_ns, size, rdev, files, total, links, len(ref)))
        append(ref)
        if not link and not xattrs:
            append(_NO_LINK_NO_XATTRS)
            continue
        append(_U16.pack(len(link)))
        append(link)
        append(_U16.pack(len(xattrs)))
        for key, val in xattrs:
            append(_U16.pack(len(key)))
            append(key)
            append(_U32.pack(len(val)))
            append(val)
    return b"".join(out)


def decode_tree(payload: bytes | memoryview) -> dict[bytes, Entry]:
    buf = bytes(payload)  # slicing bytes makes bytes at once, a memoryview a view to copy
    if not buf or buf[0] != FORMAT_VERSION:
        raise StoreIOError("tree object has an unknown format version")
    pos = 1
    entries: dict[bytes, Entry] = {}
    end = len(buf)
    u16, head, head_size = _U16.unpack_from, _HEAD.unpack_from, _HEAD.size
    xattrs: tuple[tuple[bytes, bytes], ...]
    try:
        while pos < end:
            (n,) = u16(buf, pos)
            pos += 2
            name = buf[pos : pos + n]
            pos += n
            mode, uid, gid, mtime_ns, size, rdev, files, total, links, n = head(buf, pos)
            pos += head_size
            ref = buf[pos : pos + n]
            pos += n
            if buf[pos : pos + 4] == _NO_LINK_NO_XATTRS:
                link, xattrs = b"", ()
                pos += 4
            else:
                (n,) = u16(buf, pos)
                pos += 2
                link = buf[pos : pos + n]
                pos += n
                (count,) = u16(buf, pos)
                pos += 2
                pairs = []
                for _ in range(count):
                    (n,) = u16(buf, pos)
                    pos += 2
                    key = buf[pos : pos + n]
                    pos += n
                    (n,) = _U32.unpack_from(buf, pos)
                    pos += 4
                    pairs.append((key, buf[pos : pos + n]))
                    pos += n
                xattrs = tuple(pairs)
            fields = (name, mode, uid, gid, mtime_ns, size, ref, rdev, xattrs, link)
            entries[name] = _new_entry(Entry, (*fields, files, total, links))
    except struct.error as exc:
        raise StoreIOError(f"tree object is truncated: {exc}") from None
    if pos != end:  # a field cut short by the end moved ``pos`` past it, whichever field
        raise StoreIOError("tree object is truncated")
    return entries


def tree_children(payload: bytes | memoryview) -> list[bytes]:
    """The ids a tree's entries reference (directories' trees, files' contents), with
    multiplicity: ``decode_tree`` without building entries, for the collector's marking and
    fsck, which follow every reference of every live directory.

    A second reader of the format on purpose: one generator shared with ``decode_tree`` is
    1.8x slower (1.6 ms instead of 0.9 ms for 1,100 entries).
    ``test_tree_children_are_the_refs_decode_finds`` keeps the two readers in step."""
    pages = index_pages(payload)
    if pages is not None:
        return pages
    buf = memoryview(payload)
    if not buf or buf[0] != FORMAT_VERSION:
        raise StoreIOError("tree object has an unknown format version")
    pos, end, out = 1, len(buf), []
    try:
        while pos < end:
            (n,) = _U16.unpack_from(buf, pos)
            pos += 2 + n
            (mode,) = _U32.unpack_from(buf, pos)  # the first field of _FIXED
            pos += _FIXED.size
            (n,) = _U16.unpack_from(buf, pos)
            if n and stat.S_IFMT(mode) in (stat.S_IFDIR, stat.S_IFREG):
                out.append(bytes(buf[pos + 2 : pos + 2 + n]))
            pos += 2 + n
            (n,) = _U16.unpack_from(buf, pos)  # hard-link group
            pos += 2 + n
            (count,) = _U16.unpack_from(buf, pos)
            pos += 2
            for _ in range(count):
                (n,) = _U16.unpack_from(buf, pos)
                pos += 2 + n
                (n,) = _U32.unpack_from(buf, pos)
                pos += 4 + n
    except struct.error as exc:
        raise StoreIOError(f"tree object is truncated: {exc}") from None
    return out


Pages = list[dict[bytes, Entry]]  # a paged listing's pages, in name order


class Encoding(NamedTuple):
    """A directory listing as stored."""

    tree_id: bytes
    objects: list[tuple[bytes, bytes]]  # (id, stored value): the pages in order, then the index
    pages: Pages | None  # None: the listing is one object, not paged


def tree_objects(entries: dict[bytes, Entry]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The id of a directory listing and its stored objects: one listing, or for a large
    directory its pages and then their index."""
    encoding = encode_listing(entries)
    return encoding.tree_id, encoding.objects


def encode_listing(
    entries: dict[bytes, Entry],
    like: Encoding | None = None,
    changed: Collection[bytes] | None = None,
) -> Encoding:
    """``entries`` encoded as tree objects.

    ``like``: an earlier encoding of this directory; its pages whose entries are the very
    same objects are taken as they are, not encoded again (a one-file change to a 1,000-entry
    directory encodes one page of ~32, not all ~32 pages). Objects given as ``STORED`` there
    are returned as ``STORED``. ``changed``: the only names at which ``entries`` may differ
    from ``like``'s listing; then only the pages around them are cut again, where without it
    every name of the directory is sorted and hashed, which made cutting pages the largest
    part of encoding a commit's directories."""
    if len(entries) <= PAGED_ABOVE:
        oid, value = _object(encode_tree(entries))
        return Encoding(oid, [(oid, value)], None)
    old = like.pages if like is not None and like.pages else []
    lent = like.objects if like is not None else []
    firsts = [next(iter(page)) for page in old]
    if old and changed is not None:
        cut = _recut(old, firsts, entries, changed)
    else:
        cut = [(page, None) for page in _pages(entries)]
    objects = []
    for page, kept in cut:
        if kept is None and old:  # a page cut again may still be an old one
            i = bisect_left(firsts, next(iter(page)))
            if i < len(old) and same_entries(old[i], page):
                kept = i
        objects.append(lent[kept] if kept is not None else _object(encode_tree(page)))
    index = _object(bytes([INDEX_VERSION]) + b"".join(oid for oid, _ in objects))
    objects.append(index)
    return Encoding(index[0], objects, [page for page, _ in cut])


def same_entries(a: dict | None, b: dict) -> bool:
    """Same names, each with the very same object (or None, a whiteout, in both): entries are
    immutable, so identity is enough to know two listings encode alike."""
    return (
        a is not None
        and len(a) == len(b)
        and all(name in b and b[name] is e for name, e in a.items())
    )


def _object(payload: bytes) -> tuple[bytes, bytes]:
    """A tree object's id and stored value."""
    return object_id(TYPE_TREE, payload), stored_tree_value(payload)


def stored_tree_value(payload: bytes) -> bytes:
    """A tree object's stored value: its payload, compressed where that is smaller."""
    if len(payload) > COMPRESS_ABOVE:
        frame = compress(payload)
        if len(frame) + 1 < len(payload):
            return TYPE_TREE + _COMPRESSED_MARK + frame
    return TYPE_TREE + payload


def stored_payload(value: bytes) -> bytes | memoryview:
    """A tree object's payload (what its id is the hash of) from its stored value."""
    if value[1:2] == _COMPRESSED_MARK:
        return decompress(memoryview(value)[2:])
    return memoryview(value)[1:]


def _pages(entries: dict[bytes, Entry]) -> Pages:
    pages: Pages = [{}]
    for name in sorted(entries):
        page = pages[-1]
        page[name] = entries[name]
        if _closes(page, name):
            pages.append({})
    if not pages[-1]:
        pages.pop()
    return pages


def _closes(page: dict[bytes, Entry], last: bytes) -> bool:
    """Whether ``last``, just added to ``page``, ends it."""
    return len(page) >= PAGE_MAX or _named_to_close(last)


def _named_to_close(name: bytes) -> bool:
    return xxhash.xxh3_64_intdigest(name) % PAGE_AVERAGE == 0


def _recut(
    old: Pages, firsts: list[bytes], entries: dict[bytes, Entry], changed: Collection[bytes]
) -> list[tuple[dict[bytes, Entry], int | None]]:
    """``_pages(entries)``, from the pages ``old`` (whose first names are ``firsts``) of a
    listing that differs from ``entries`` only at the names ``changed``: each page with its
    index in ``old`` if it is that page.

    A boundary depends on the names since the one before, so the pages without a changed
    name are still pages of the new listing as long as the cut is back in step before them:
    the pages from a changed one on are cut again until a new page ends where an old one
    ended."""
    near: dict[int, list[bytes]] = {}
    for name in changed:  # a name before the first page's first is cut with that page
        near.setdefault(max(bisect_right(firsts, name) - 1, 0), []).append(name)
    cut: list[tuple[dict[bytes, Entry], int | None]] = []
    i = 0
    while i < len(old):
        if i not in near:
            cut.append((old[i], i))
            i += 1
            continue
        page: dict[bytes, Entry] = {}
        while i < len(old):
            for name in sorted(old[i].keys() | near.get(i, ())):
                entry = entries.get(name)
                if entry is None:
                    continue  # removed
                page[name] = entry
                if _closes(page, name):
                    cut.append((page, None))
                    page = {}
            i += 1
            if not page:
                break  # in step: old page i - 1 ended here too
        if page:
            cut.append((page, None))
    return cut


def _cut_as_pages_would(pages: Pages) -> bool:
    """Whether stored pages are those ``_pages`` cuts their listing into: names in order, and
    each page ending at its first name that closes one. This store writes no other, but a
    pulled listing is another's encoding, and ``_recut`` keeps the pages it is given."""
    previous = b""
    for n, page in enumerate(pages):
        names = list(page)
        if not names or len(names) > PAGE_MAX or names[0] <= previous:
            return False
        previous = names[-1]
        if any(a >= b for a, b in zip(names, names[1:], strict=False)):
            return False
        if any(_named_to_close(name) for name in names[:-1]):
            return False
        if n < len(pages) - 1 and not _closes(page, names[-1]):
            return False
    return True


def index_pages(payload: bytes | memoryview) -> list[bytes] | None:
    """The page ids of an index object's payload; None if the payload is a listing."""
    buf = memoryview(payload)
    if not buf or buf[0] != INDEX_VERSION:
        return None
    body = buf[1:]
    if len(body) % ID_SIZE:
        raise StoreIOError("tree index object is truncated")
    return [bytes(body[i : i + ID_SIZE]) for i in range(0, len(body), ID_SIZE)]


def file_key(e: Entry) -> tuple:
    """Everything that makes two non-directory entries the same file to a reader."""
    return (e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.ref, e.rdev, e.xattrs, e.link)


def _weight(listing: _Listing) -> int:
    """The entries a cached listing holds: twice its names when it keeps its pages too."""
    return len(listing.entries) * (1 if listing.paged is None else 2)


class _Listing(NamedTuple):
    entries: dict[bytes, Entry]
    paged: Encoding | None  # a paged listing's pages, its objects all STORED
    # whether ``paged`` is cut as ``_pages`` cuts: known for what this store encoded, checked
    # for what it decoded when a commit first asks (the check costs a fifth of the decode)
    cut_here: bool


class TreeStore:
    """Decoded trees by id, with an LRU cache (trees are immutable, so caching is always safe)."""

    def __init__(
        self, content: ContentStore, cache_trees: int = 4096, cache_entries: int = CACHED_ENTRIES
    ) -> None:
        self.content = content
        self._cache: OrderedDict[bytes, _Listing] = OrderedDict()
        self._cache_size = cache_trees
        self._cache_entries = cache_entries
        self._cached_entries = 0
        self._lock = threading.Lock()

    def root_of(self, superroot_hex: str | None) -> Entry | None:
        """The root directory entry of the tree of superroot ``superroot_hex`` (a one-entry
        tree holding the root under the empty name; None: no tree)."""
        if not superroot_hex:
            return None
        return self.get(bytes.fromhex(superroot_hex))[ROOT_NAME]

    def get(
        self,
        tree_id: bytes,
        txn: lmdb.Transaction | None = None,
        extra: dict[bytes, dict[bytes, Entry]] | None = None,
    ) -> dict[bytes, Entry]:
        """A tree by id; ``extra`` holds decoded trees built in memory but not stored (status)."""
        if extra is not None and tree_id in extra:
            return extra[tree_id]
        return self._listing(tree_id, txn).entries

    def remember(
        self, tree_id: bytes, entries: dict[bytes, Entry], encoding: Encoding | None = None
    ) -> None:
        """Cache a directory just built (its id is its content's, so this is always right),
        with its pages if ``encoding`` has them."""
        paged = None
        if encoding is not None and encoding.pages is not None:
            paged = encoding._replace(objects=[(oid, STORED) for oid, _ in encoding.objects])
        self._keep(tree_id, _Listing(entries, paged, True))

    def stored_encoding(self, tree_id: bytes) -> Encoding | None:
        """Stored tree ``tree_id`` as ``encode_listing`` takes it for ``like``: its pages, its
        objects all ``STORED``; None unless it is paged as ``_pages`` cuts (a cut this store
        did not make is not lent: ``_recut`` would carry it on)."""
        listing = self._listing(tree_id, None)
        if listing.paged is not None and not listing.cut_here:
            if not _cut_as_pages_would(listing.paged.pages or []):
                listing = listing._replace(paged=None)
            self._keep(tree_id, listing._replace(cut_here=True))
        return listing.paged

    def get_quick(self, tree_id: bytes) -> dict[bytes, Entry] | None:
        """A tree if it is cached or quick to decode (at most ``QUICK_PAGES`` pages); None
        if decoding it is a job for a thread: a paged directory may hold millions of
        entries, seconds of decoding."""
        hit = self._cached(tree_id)
        if hit is not None:
            return hit.entries
        payload = self._payload(tree_id, None)
        ids = index_pages(payload)
        if ids is not None and len(ids) > QUICK_PAGES:
            return None
        return self._decoded(tree_id, payload, ids, None).entries

    def _listing(self, tree_id: bytes, txn: lmdb.Transaction | None) -> _Listing:
        hit = self._cached(tree_id)
        if hit is not None:
            return hit
        payload = self._payload(tree_id, txn)
        return self._decoded(tree_id, payload, index_pages(payload), txn)

    def _cached(self, tree_id: bytes) -> _Listing | None:
        with self._lock:
            hit = self._cache.get(tree_id)
            if hit is not None:
                self._cache.move_to_end(tree_id)
            return hit

    def _decoded(
        self,
        tree_id: bytes,
        payload: bytes | memoryview,
        ids: list[bytes] | None,
        txn: lmdb.Transaction | None,
    ) -> _Listing:
        """Tree ``tree_id`` from its stored ``payload`` (``ids``: its page ids, if an index),
        cached."""
        if ids is None:
            listing = _Listing(decode_tree(payload), None, True)
        else:
            pages = [decode_tree(self._payload(pid, txn)) for pid in ids]
            entries: dict[bytes, Entry] = {}
            for page in pages:
                entries.update(page)
            objects = [(pid, STORED) for pid in ids] + [(tree_id, STORED)]
            listing = _Listing(entries, Encoding(tree_id, objects, pages), False)
        self._keep(tree_id, listing)
        return listing

    def _keep(self, tree_id: bytes, listing: _Listing) -> None:
        """Cache ``listing``; the newest one stays, however large, so that a directory of a
        million entries is decoded once, not at each lookup in it."""
        with self._lock:
            old = self._cache.pop(tree_id, None)
            if old is not None:
                self._cached_entries -= _weight(old)
            self._cache[tree_id] = listing
            self._cached_entries += _weight(listing)
            while len(self._cache) > 1 and (
                len(self._cache) > self._cache_size or self._cached_entries > self._cache_entries
            ):
                _, dropped = self._cache.popitem(last=False)
                self._cached_entries -= _weight(dropped)

    def _payload(self, oid: bytes, txn: lmdb.Transaction | None) -> bytes | memoryview:
        value = self.content.get(oid, txn)
        if value[:1] != TYPE_TREE:
            raise StoreIOError(f"object {oid.hex()} is not a tree")
        return stored_payload(value)

    def lookup(self, root: Entry, path: bytes, txn: lmdb.Transaction | None = None) -> Entry | None:
        """The entry at a relative ``a/b/c`` path under directory entry ``root``."""
        cur = root
        for part in [p for p in path.split(b"/") if p]:
            if not cur.is_dir:
                return None
            nxt = self.get(cur.ref, txn).get(part)
            if nxt is None:
                return None
            cur = nxt
        return cur

    def walk(
        self,
        root: Entry,
        prefix: bytes = b"",
        txn: lmdb.Transaction | None = None,
        extra: dict[bytes, dict[bytes, Entry]] | None = None,
    ) -> Iterator[tuple[bytes, Entry]]:
        """Every (path, entry) below directory entry ``root``, parents before children."""
        stack = [(prefix, root)]
        while stack:
            path, entry = stack.pop()
            children = self.get(entry.ref, txn, extra)
            for name in sorted(children, reverse=True):
                child = children[name]
                child_path = path + b"/" + name if path else name
                yield child_path, child
                if child.is_dir:
                    stack.append((child_path, child))

    def diff(
        self, a: Entry | None, b: Entry | None, extra: dict[bytes, dict[bytes, Entry]] | None = None
    ) -> list[Change]:
        """Changes that turn tree ``a`` into tree ``b`` (roots as directory entries)."""
        changes: list[Change] = []
        # directory pairs to compare, on a stack, not a recursion: a tree may be deeper than
        # Python's recursion limit (the order changes are found in does not matter: sorted)
        pairs: list[tuple[Entry | None, Entry | None, bytes]] = [(a, b, b"")]
        while pairs:
            self._diff_dirs(*pairs.pop(), changes, pairs, extra)
        changes.sort()
        return changes

    def _diff_dirs(
        self,
        a: Entry | None,
        b: Entry | None,
        path: bytes,
        changes: list[Change],
        pairs: list[tuple[Entry | None, Entry | None, bytes]],
        extra,
    ) -> None:
        """The changes within directories ``a`` and ``b``; pairs of subdirectories to compare
        go on ``pairs``."""
        if a is not None and b is not None and a.ref == b.ref:
            return
        left = self.get(a.ref, None, extra) if a is not None else {}
        right = self.get(b.ref, None, extra) if b is not None else {}
        for name in sorted(left.keys() | right.keys()):
            ea, eb = left.get(name), right.get(name)
            child = path + b"/" + name if path else name
            if ea is None:
                assert eb is not None  # the name is in one listing at least
                self._report_all(eb, child, "A", changes, extra)
            elif eb is None:
                self._report_all(ea, child, "D", changes, extra)
            elif ea.is_dir and eb.is_dir:
                if _dir_meta(ea) != _dir_meta(eb):
                    changes.append(Change(_text(child), "M"))
                pairs.append((ea, eb, child))
            elif ea.is_dir != eb.is_dir:
                self._report_all(ea, child, "D", changes, extra)
                self._report_all(eb, child, "A", changes, extra)
            elif file_key(ea) != file_key(eb):
                changes.append(Change(_text(child), "M"))

    def _report_all(
        self, entry: Entry, path: bytes, kind: str, changes: list[Change], extra
    ) -> None:
        changes.append(Change(_text(path), kind))
        if entry.is_dir:
            for sub, _ in self.walk(entry, path, extra=extra):
                changes.append(Change(_text(sub), kind))


def _dir_meta(e: Entry) -> tuple:
    return (e.mode, e.uid, e.gid, e.xattrs)


def _text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")
