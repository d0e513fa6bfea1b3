"""Unit tests of the content store and the tree format (no mounts needed)."""

from __future__ import annotations

import os
import random
import stat
import threading
from collections import Counter

import pytest
import zstandard

from cascowfs import cas, codec
from cascowfs.errors import StoreIOError
from cascowfs.model import Entry
from cascowfs import trees as trees_mod
from cascowfs.trees import (STORED, TreeStore, decode_tree, encode_listing, encode_tree,
                            index_pages, stored_payload, tree_children, tree_objects)


def tree_object(entries: dict[bytes, Entry]) -> tuple[bytes, bytes]:
    """(id, value) of a directory small enough to be one object."""
    _, objects = tree_objects(entries)
    (only,) = objects
    return only


def _store(content: cas.ContentStore, data: bytes) -> bytes:
    prepared = cas.prepare_content(data)
    content.db.write(lambda txn: content.put_objects(txn, prepared.objects))
    return prepared.content_id


def test_multi_chunk_file_reads_back_at_any_offset(content):
    data = os.urandom(3 * cas.CHUNK_MAX + 12345)
    cid = _store(content, data)
    assert content.get(cid)[:1] == cas.TYPE_LIST
    assert content.read(cid) == data
    for offset, size in [(0, 1), (cas.CHUNK_MIN - 3, 10), (len(data) - 5, 100), (12345, 400000)]:
        assert content.read(cid, offset, size) == data[offset:offset + size]
    assert content.read(cid, len(data) + 10, 5) == b""


def test_identify_content_matches_prepare_content():
    for data in (b"", b"x", os.urandom(cas.CHUNK_MAX * 2 + 7)):
        assert cas.identify_content(data).content_id == cas.prepare_content(data).content_id


def test_domain_prefix_keeps_a_file_from_aliasing_a_tree():
    entries = {b"a": Entry(b"a", stat.S_IFREG | 0o644, 0, 0, 1, 1, b"\x01" * 32)}
    tree_id, value = tree_object(entries)
    forged = cas.prepare_content(value[1:])  # a file whose bytes are that tree's encoding
    assert forged.content_id != tree_id


def test_small_chunks_share_packs_and_read_back(content):
    blobs = [os.urandom(100 + i) for i in range(50)] + [b"same" * 10]
    prepared = [cas.prepare_content(b) for b in blobs]
    content.db.write(lambda txn: content.put_objects(txn, [o for p in prepared for o in p.objects]))
    ids = [p.content_id for p in prepared]
    assert _store(content, b"same" * 10) == ids[-1]  # dedup: no second copy, no new pack
    with content.db.read() as txn:
        kinds = [bytes(v[:1]) for _, v in txn.cursor(db=content.objects)]
    assert kinds.count(cas.TYPE_PACK) == 1
    assert kinds.count(cas.TYPE_CHUNK) == len(blobs)
    for cid, blob in zip(ids, blobs):
        assert content.read(cid) == blob
        assert content.verify(cid, content.get(cid))


def _source_like(size: int, seed: int) -> bytes:
    """Compressible bytes with enough variety for content-defined chunking to cut them."""
    rng = random.Random(seed)
    words = [b"static", b"int", b"return", b"struct", b"*dev", b"(void)", b"{", b"}", b";\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" " + str(rng.randrange(10**6)).encode() + b" "
    return bytes(out[:size])


def _values(content: cas.ContentStore) -> dict[bytes, bytes]:
    with content.db.read() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=content.objects)}


def test_large_chunks_are_packed_too(content):
    """Chunks above 16 KiB were compressed one by one, each rounded up to whole LMDB overflow
    pages (~2 KiB lost per chunk); every chunk now lives in a pack."""
    data = _source_like(5 * cas.CHUNK_AVG, 1)
    prepared = cas.prepare_content(data)
    objects = content.pack_missing(prepared.objects)
    content.db.write(lambda txn: content.put_objects(txn, objects))
    values = _values(content)
    chunks = [v for v in values.values() if v[:1] == cas.TYPE_CHUNK]
    assert len(chunks) > 1 and max(len(v) for v in chunks) < 64  # pointers, not data
    packs = [v for v in values.values() if v[:1] == cas.TYPE_PACK]
    assert sum(map(len, packs)) < len(data) // 2
    assert content.read(prepared.content_id) == data
    for offset, size in [(0, 10), (cas.CHUNK_AVG + 5, 3 * cas.CHUNK_AVG), (len(data) - 3, 10)]:
        assert content.read(prepared.content_id, offset, size) == data[offset:offset + size]
    assert all(content.verify(oid, v) for oid, v in values.items()
               if v[:1] in (cas.TYPE_CHUNK, cas.TYPE_PACK))


@pytest.mark.parametrize("level", [codec.IMPORT_ZSTD_LEVEL, codec.ZSTD_LEVEL])
def test_packs_read_back_at_every_level_with_ids_of_the_data_alone(content, level):
    """An import's workers pack at a faster level than the rest of the store; ids name the
    uncompressed bytes, so the same chunks packed at either level are the same objects."""
    data = _source_like(5 * cas.CHUNK_AVG, 4)
    prepared = cas.prepare_content(data)
    objects = cas.pack_unpacked(prepared.objects, level)
    other = cas.pack_unpacked(prepared.objects, codec.ZSTD_LEVEL)
    assert [oid for oid, _ in objects] == [oid for oid, _ in other]
    content.db.write(lambda txn: content.put_objects(txn, objects))
    packs = [v for v in _values(content).values() if v[:1] == cas.TYPE_PACK]
    assert sum(map(len, packs)) < len(data) // 2
    assert content.read(prepared.content_id) == data
    assert all(content.verify(oid, v) for oid, v in _values(content).items())


def test_packs_compressed_side_by_side_are_the_packs_made_one_by_one():
    """An operation compresses its packs on threads; the objects, and their order, are
    those of compressing them one after another, and no thread outlives the call."""
    data = _source_like(6 * cas.PACK_TARGET, 5)
    prepared = cas.prepare_content(data)
    before = {t.name for t in threading.enumerate()}
    parallel = cas.pack_unpacked(prepared.objects, parallel=True)
    assert {t.name for t in threading.enumerate()} == before
    assert parallel == cas.pack_unpacked(prepared.objects)
    assert sum(v[:1] == cas.TYPE_PACK for _, v in parallel) >= 4


def test_pack_missing_leaves_out_chunks_the_store_has(content):
    old, new = _source_like(3 * cas.CHUNK_AVG, 2), _source_like(3 * cas.CHUNK_AVG, 3)
    old_id = _store(content, old)
    before = _values(content)
    prepared = cas.prepare_content(new)
    old_objects = cas.prepare_content(old).objects
    objects = content.pack_missing(old_objects + prepared.objects)
    (pack,) = [v for _, v in objects if v[:1] == cas.TYPE_PACK]
    assert len(content._payload(pack)) == len(new)  # none of old's chunks
    # old's chunks still reach put_objects (a running collection must learn they are used)
    assert {oid for oid, _ in old_objects} <= {oid for oid, _ in objects}
    content.db.write(lambda txn: content.put_objects(txn, objects))
    after = _values(content)
    assert {k: v for k, v in after.items() if k in before} == before  # old's objects untouched
    assert content.read(old_id) == old and content.read(prepared.content_id) == new


def test_chunks_stored_one_by_one_by_earlier_versions_still_read(content):
    data = _source_like(40_000, 4)
    oid = cas.object_id(cas.TYPE_CHUNK, data)
    value = cas.TYPE_CHUNK + cas._ZSTD + zstandard.ZstdCompressor(level=3).compress(data)
    content.db.write(lambda txn: txn.put(oid, value, db=content.objects))
    assert content.read(oid) == data and content.verify(oid, value)


def test_verify_detects_corruption(content):
    fid = _store(content, b"some content " * 100)
    value = content.get(fid)
    assert content.verify(fid, value)
    assert not content.verify(fid, cas.TYPE_CHUNK + b"\x00" + b"some content " * 99)


def test_tree_encoding_round_trips_every_field():
    entries = {
        b"f": Entry(b"f", stat.S_IFREG | 0o4755, 1000, 100, -5, 7, b"\x02" * 32, 0,
                    ((b"user.a", b"\x00\xff"), (b"user.b", b"")), b"k" * 16),
        b"\xff\xfename": Entry(b"\xff\xfename", stat.S_IFLNK | 0o777, 0, 0, 2**62, 3, b"../x"),
        b"dev": Entry(b"dev", stat.S_IFCHR | 0o600, 0, 0, 0, 0, b"", os.makedev(1, 3)),
        b"d": Entry(b"d", stat.S_IFDIR | 0o700, 0, 0, 9, 0, b"\x03" * 32, 0, (), b"", 12, 3456),
    }
    assert decode_tree(encode_tree(entries)) == entries


def test_tree_children_are_the_refs_decode_finds():
    entries = {
        b"f": Entry(b"f", stat.S_IFREG | 0o644, 0, 0, 1, 7, b"\x02" * 32, 0,
                    ((b"user.a", b"v" * 300),), b"k" * 16),
        b"g": Entry(b"g", stat.S_IFREG | 0o644, 0, 0, 1, 7, b"\x02" * 32),  # same content twice
        b"empty": Entry(b"empty", stat.S_IFREG | 0o644, 0, 0, 1, 0, b""),
        b"link": Entry(b"link", stat.S_IFLNK | 0o777, 0, 0, 2, 3, b"../x" * 20),
        b"dev": Entry(b"dev", stat.S_IFCHR | 0o600, 0, 0, 0, 0, b"", os.makedev(1, 3)),
        b"d": Entry(b"d", stat.S_IFDIR | 0o700, 0, 0, 9, 0, b"\x03" * 32, 0, (), b"", 12, 3456),
    }
    payload = encode_tree(entries)
    expected = [e.ref for e in decode_tree(payload).values() if (e.is_dir or e.is_file) and e.ref]
    assert Counter(tree_children(payload)) == Counter(expected) == Counter([b"\x02" * 32] * 2 + [b"\x03" * 32])
    with pytest.raises(StoreIOError):
        tree_children(payload[:-3])


def test_dry_run_write_changes_nothing(content):
    oid = _store(content, b"x" * 100)
    seen = content.db.write(lambda txn: (txn.delete(oid, db=content.objects),
                                         txn.get(oid, db=content.objects))[1], dry_run=True)
    assert seen is None  # gone inside the transaction ...
    with content.db.read() as txn:
        assert txn.get(oid, db=content.objects) is not None  # ... and back after it


def test_truncated_tree_is_reported_not_crashed():
    payload = encode_tree({b"f": Entry(b"f", stat.S_IFREG, 0, 0, 0, 0, b"")})
    with pytest.raises(StoreIOError):
        decode_tree(payload[:-3])


def test_a_tree_cut_anywhere_is_reported_truncated():
    """Every cut inside an entry, its ref, link and xattr values included, is an error: none
    decodes to a listing with a shortened field. (A cut between entries is a shorter listing;
    the object's id, not its format, tells that apart.)"""
    entries = {
        b"a": Entry(b"a", stat.S_IFREG | 0o644, 0, 0, 1, 7, b"\x02" * 32, 0,
                    ((b"user.a", b"v" * 40),), b"k" * 16),
        b"b": Entry(b"b", stat.S_IFREG | 0o644, 0, 0, 1, 7, b"\x03" * 32),
    }
    payload = encode_tree(entries)
    assert decode_tree(payload) == entries
    names = sorted(entries)
    between = {len(encode_tree({n: entries[n] for n in names[:k]})) for k in range(len(names))}
    for cut in sorted(set(range(1, len(payload))) - between):
        with pytest.raises(StoreIOError):
            decode_tree(payload[:cut])


def test_decoded_entries_are_entries_with_bytes_fields():
    entries = {b"f": Entry(b"f", stat.S_IFREG | 0o644, 0, 0, 1, 7, b"\x02" * 32, 0,
                           ((b"user.a", b"v"),), b"k" * 16)}
    (decoded,) = decode_tree(memoryview(encode_tree(entries))).values()
    assert type(decoded) is Entry and decoded.is_file and not decoded.is_dir
    assert all(type(v) is bytes for v in (decoded.name, decoded.ref, decoded.link,
                                           *decoded.xattrs[0]))
    assert decoded._replace(size=8).size == 8 and decoded.size == 7


def test_diff_reports_adds_deletes_modifications_and_type_changes(content):
    trees = TreeStore(content)

    def tree(entries):
        tid, value = tree_object(entries)
        content.db.write(lambda txn: content.put_objects(txn, [(tid, value)]))
        return tid

    f = lambda name, ref: Entry(name, stat.S_IFREG | 0o644, 0, 0, 1, 1, ref)
    sub = tree({b"x": f(b"x", b"\x01" * 32)})
    a = tree({b"keep": f(b"keep", b"\x01" * 32), b"gone": f(b"gone", b"\x01" * 32),
              b"chg": f(b"chg", b"\x01" * 32),
              b"t": Entry(b"t", stat.S_IFDIR | 0o755, 0, 0, 1, 0, sub)})
    b = tree({b"keep": f(b"keep", b"\x01" * 32), b"new": f(b"new", b"\x01" * 32),
              b"chg": f(b"chg", b"\x02" * 32), b"t": f(b"t", b"\x01" * 32)})
    root = lambda tid: Entry(b"", stat.S_IFDIR | 0o755, 0, 0, 0, 0, tid)
    lines = [c.line() for c in trees.diff(root(a), root(b))]
    assert lines == ["M chg", "D gone", "A new", "A t", "D t", "D t/x"]
    assert trees.diff(root(a), root(a)) == []


def _files(names, ref=b"\x05" * 32):
    return {n: Entry(n, stat.S_IFREG | 0o644, 0, 0, 1, 1, ref) for n in names}


def test_large_directories_are_paged_and_read_back_whole(content):
    entries = _files([f"file{i:05d}.c".encode() for i in range(3000)])
    top, objects = tree_objects(entries)
    assert top == objects[-1][0]
    pages = index_pages(stored_payload(objects[-1][1]))
    assert pages == [oid for oid, _ in objects[:-1]]
    sizes = [len(decode_tree(stored_payload(v))) for _, v in objects[:-1]]
    assert sum(sizes) == 3000 and max(sizes) <= trees_mod.PAGE_MAX and len(sizes) > 3000 // 128
    assert tree_children(stored_payload(objects[-1][1])) == pages
    content.db.write(lambda txn: content.put_objects(txn, objects))
    assert TreeStore(content).get(top) == entries
    small = _files([b"a", b"b"])
    assert len(tree_objects(small)[1]) == 1  # small directories stay one listing


def test_listings_are_stored_compressed_under_the_id_of_their_plain_encoding(content):
    entries = {n: Entry(n, stat.S_IFREG | 0o644, 0, 0, 1_700_000_000 * 10**9, 100 + i,
                        bytes([i]) * 32) for i, n in enumerate(b"f%03d.c" % i for i in range(60))}
    oid, [(_, value)] = tree_objects(entries)
    plain = encode_tree(entries)
    assert oid == cas.object_id(cas.TYPE_TREE, plain)
    assert value[1] == trees_mod.COMPRESSED and len(value) < len(plain) // 2
    assert bytes(stored_payload(value)) == plain
    content.db.write(lambda txn: content.put_objects(txn, [(oid, value)]))
    assert TreeStore(content).get(oid) == entries
    assert content.verify(oid, value)
    assert Counter(cas.children_of(value)) == Counter(e.ref for e in entries.values())
    _, [(_, tiny)] = tree_objects(_files([b"a"]))
    assert tiny[1:] == encode_tree(_files([b"a"]))  # too small to gain: stored plain
    damaged = value[:-8] + b"\0" * 8
    with pytest.raises(StoreIOError):
        stored_payload(damaged)
    assert not content.verify(oid, damaged)


def test_one_changed_entry_makes_one_new_page(content):
    names = [f"header{i:05d}.h".encode() for i in range(1100)]
    before = tree_objects(_files(names))[1]
    changed = dict(_files(names))
    changed[names[500]] = Entry(names[500], stat.S_IFREG | 0o644, 0, 0, 2, 1, b"\x06" * 32)
    added = dict(changed)
    added[b"header00500a.h"] = changed[names[500]]
    for after_entries in (changed, added):
        after = tree_objects(after_entries)[1]
        new = {oid for oid, _ in after} - {oid for oid, _ in before}
        assert len(new) == 2  # the page holding the entry, and the index


def test_an_earlier_encoding_lends_its_unchanged_pages(monkeypatch):
    """Given an earlier encoding, only pages whose entries are not the very same objects are
    encoded again, and the result is exactly a fresh encoding's."""
    names = [f"header{i:05d}.h".encode() for i in range(1100)]
    old = _files(names)
    earlier = encode_listing(old)
    encoded: list[int] = []
    real = trees_mod.encode_tree
    monkeypatch.setattr(trees_mod, "encode_tree", lambda e: (encoded.append(len(e)), real(e))[1])
    changed = dict(old)
    changed[names[500]] = Entry(names[500], stat.S_IFREG | 0o644, 0, 0, 2, 1, b"\x06" * 32)
    added = dict(changed)
    added[b"header00500a.h"] = changed[names[500]]
    equal_but_new = _files(names)  # equal entries, other objects: encoded again, same result
    for new, at in ((changed, [names[500]]), (added, [names[500], b"header00500a.h"]),
                    (equal_but_new, None)):
        for hint in (None, at):
            encoded.clear()
            lent = encode_listing(new, like=earlier, changed=hint)
            pages = len(encoded)
            assert lent == encode_listing(new)
            assert pages == (len(earlier.objects) - 1 if new is equal_but_new else 1), pages
    assert encode_listing(_files(names[:10]), like=earlier) == encode_listing(_files(names[:10]))


def _never_closing(count: int, prefix: bytes) -> list[bytes]:
    """Names none of which ends a page by its hash: a run of them ends pages by their size."""
    names, i = [], 0
    while len(names) < count:
        name = prefix + b"%06d" % i
        if not trees_mod._named_to_close(name):
            names.append(name)
        i += 1
    return names


def test_pages_cut_again_around_changes_are_a_fresh_cut():
    """Cutting only around the changed names gives the pages, ids and objects of cutting the
    whole listing, whatever the changes: names added before the first and after the last,
    whole pages removed, runs long enough to end pages by size, a listing growing out of one
    object or shrinking into one."""
    rng = random.Random(7)
    pool = [f"n{i:05d}".encode() for i in range(3000)] + _never_closing(400, b"m")
    for _ in range(150):
        old = _files(rng.sample(pool, rng.choice([40, 70, 300, 1500])))
        earlier = encode_listing(old)
        new = dict(old)
        touched: set[bytes] = set()
        for _ in range(rng.choice([1, 2, 5, 40, 400])):
            name = rng.choice(pool)
            touched.add(name)
            if name in new and rng.random() < 0.5:
                del new[name]
            else:
                new[name] = Entry(name, stat.S_IFREG | 0o644, 0, 0, 3, 1, b"\x07" * 32)
        if rng.random() < 0.2:  # a whole stretch removed
            gone = sorted(new)[rng.randrange(len(new)):][: rng.randrange(1, 300)]
            for name in gone:
                del new[name]
            touched.update(gone)
        fresh = encode_listing(new)
        assert encode_listing(new, like=earlier, changed=touched) == fresh
        if fresh.pages is not None:
            assert fresh.pages == trees_mod._pages(new)


def test_one_change_cuts_the_pages_around_it_not_the_listing(monkeypatch):
    names = [f"header{i:05d}.h".encode() for i in range(1500)]
    earlier = encode_listing(_files(names))
    hashed: list[bytes] = []
    real = trees_mod._named_to_close
    monkeypatch.setattr(trees_mod, "_named_to_close", lambda n: (hashed.append(n), real(n))[1])
    new = _files(names)
    new[b"header00700a.h"] = new[names[700]]
    whole = encode_listing(new, like=earlier)
    assert len(hashed) == len(new)  # without the changed names: every name
    hashed.clear()
    assert encode_listing(new, like=earlier, changed=[b"header00700a.h"]) == whole
    assert 0 < len(hashed) <= 3 * trees_mod.PAGE_MAX


def test_a_stored_listing_lends_its_own_pages(content):
    entries = _files([f"file{i:05d}.c".encode() for i in range(900)])
    encoding = encode_listing(entries)
    content.db.write(lambda txn: content.put_objects(txn, encoding.objects))
    trees = TreeStore(content)
    lent = trees.stored_encoding(encoding.tree_id)
    assert lent is not None and lent.pages == encoding.pages
    assert lent.objects == [(oid, STORED) for oid, _ in encoding.objects]
    remembered = TreeStore(content)
    remembered.remember(encoding.tree_id, entries, encoding)
    assert remembered.stored_encoding(encoding.tree_id) == lent
    small = encode_listing(_files([b"a"]))
    content.db.write(lambda txn: content.put_objects(txn, small.objects))
    assert trees.stored_encoding(small.tree_id) is None


@pytest.mark.parametrize("cut", ["early", "late", "disordered"])
def test_a_listing_paged_unlike_this_store_pages_is_read_but_not_lent(content, cut):
    """A pulled listing may be paged by another's rules: it reads back whole, but its pages
    are not lent to a commit, which would carry them on."""
    names = sorted(f"file{i:05d}.c".encode() for i in range(300))
    canonical = trees_mod._pages(_files(names))
    if cut == "early":  # a page ends before a name that would end it
        split = [dict(list(canonical[0].items())[:-1])] + [_files([list(canonical[0])[-1]])]
        pages = split + canonical[1:]
    elif cut == "late":  # two pages joined
        pages = [{**canonical[0], **canonical[1]}] + canonical[2:]
    else:  # the last two pages swapped
        pages = canonical[:-2] + [canonical[-1], canonical[-2]]
    objects = [trees_mod._object(encode_tree(page)) for page in pages]
    index = trees_mod._object(bytes([trees_mod.INDEX_VERSION]) + b"".join(o for o, _ in objects))
    content.db.write(lambda txn: content.put_objects(txn, objects + [index]))
    trees = TreeStore(content)
    assert trees.get(index[0]) == _files(names)
    assert trees.stored_encoding(index[0]) is None
    assert trees.stored_encoding(index[0]) is None  # the verdict, kept
    assert trees.get(index[0]) == _files(names)




def _stored_tree(content: cas.ContentStore, n: int, tag: bytes = b"") -> bytes:
    """A directory of ``n`` files, stored: its id."""
    entries = {b"%s%06d" % (tag, i): Entry(b"%s%06d" % (tag, i), stat.S_IFREG | 0o644, 0, 0, 0,
                                           0, b"") for i in range(n)}
    tree_id, objects = tree_objects(entries)
    content.db.write(lambda txn: content.put_objects(txn, objects))
    return tree_id


def test_a_large_directory_is_not_quick_until_it_is_cached(content):
    trees = TreeStore(content)
    small, large = _stored_tree(content, 40), _stored_tree(content, 5000)
    assert len(index_pages(stored_payload(content.get(large)))) > trees_mod.QUICK_PAGES
    assert len(trees.get_quick(small)) == 40
    assert trees.get_quick(large) is None  # seconds of decoding at a million entries
    assert len(trees.get(large)) == 5000
    assert len(trees.get_quick(large)) == 5000  # cached now


def test_the_tree_cache_is_bounded_by_entries_and_keeps_the_newest(content):
    trees = TreeStore(content, cache_entries=3000)
    a, b, c = (_stored_tree(content, 1000, tag) for tag in (b"a", b"b", b"c"))
    for tree_id in (a, b, c):
        trees.get(tree_id)  # paged: 2,000 entries cached each, pages and names
    assert trees._cached_entries <= 3000 and list(trees._cache) == [c]
    huge = _stored_tree(content, 4000, b"h")
    trees.get(huge)  # alone over the bound: kept, as the newest
    assert list(trees._cache) == [huge] and trees._cached_entries == 8000
    trees.get(a)
    assert list(trees._cache) == [a]
