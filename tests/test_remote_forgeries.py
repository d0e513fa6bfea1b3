"""A remote that forges what a push never writes: big directories' indexes (paged listings)
that the store could not read as pulled, and objects larger than any writer makes, read whole
into a root daemon's memory. Each refused with EIO naming the object, nothing recorded.
Against a real directory and the S3 server on 127.0.0.1, as tests/test_remotes.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import assert_fsck_clean, open_store, snapshot_view
from test_remotes import _dir, made_remote, remote, s3_endpoint  # noqa: F401 (fixtures)
from cascowfs.cas import prepare_content
from cascowfs.catalog import Observation
from cascowfs.codec import TYPE_TREE, compress, object_id
from cascowfs.errors import StoreIOError
from cascowfs.model import Entry
from cascowfs.names import MAX_LABEL_VALUE_CHARS, MAX_LABELS_BYTES, check_labels
from cascowfs.remote import config, objectstore, packs, transfer
from cascowfs.trees import FORMAT_VERSION, INDEX_VERSION, encode_tree, index_pages, stored_payload

HELLO = prepare_content(b"hello")
CHUNK = (b"C", HELLO.content_id, b"hello")


def _hello(name: bytes) -> Entry:
    return Entry(name, stat.S_IFREG | 0o644, 1000, 0, 0, 5, HELLO.content_id)


def _tid(payload: bytes) -> bytes:
    return object_id(TYPE_TREE, payload)


def _listing(*names: bytes) -> bytes:
    """A page: files of b"hello" named ``names``, as the store encodes them (sorted)."""
    return encode_tree({name: _hello(name) for name in names})


def _index(*pages: bytes) -> bytes:
    """A big directory's index of the pages of ids ``pages``."""
    return bytes([INDEX_VERSION]) + b"".join(pages)


def _forge(
    rs, root: bytes, trees: list[bytes], objects: tuple = (CHUNK,), *, id: str = "forged"
) -> None:
    """A ref ``id`` on ``rs`` whose superroot is tree ``root``, in one pack with the tree
    payloads ``trees`` and ``objects`` (kind, id, payload)."""
    builder = packs.PackBuilder()
    for kind, oid, payload in objects:
        builder.add(kind, oid, payload)
    for payload in trees:
        builder.add(TYPE_TREE, _tid(payload), payload)
    pack_name, pack, index_name, index = builder.seal()
    rs.put(packs.pack_key(pack_name), pack)
    rs.put(packs.index_key(index_name), index)
    ref = transfer.RemoteSnapshot(id, root.hex(), None, 0, {}, 0, 0)
    rs.put_new(transfer.ref_key(id), ref.encode())


def _forge_directory(
    rs, tree: bytes, trees: list[bytes], totals: tuple[int, int, int], *, id: str = "forged"
) -> None:
    """A ref ``id`` whose root directory is tree ``tree`` (sent with ``trees``), said to hold
    ``totals``."""
    superroot = encode_tree({b"": _dir(b"", {}, *totals, ref=tree)})
    _forge(rs, _tid(superroot), [*trees, superroot], id=id)


def _refused(tmp_path: Path, case: str, problem: str, forge, have=None) -> None:
    """A pull of what ``forge(rs)`` puts on a fresh remote: EIO matching ``problem``, no
    snapshot recorded, and the store clean for fsck. ``have(sm)``: what the store holds."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/{case}"))
    store = tmp_path / f"store-{case}"
    with open_store(store) as sm:
        if have is not None:
            have(sm)
        forge(rs)
        with pytest.raises(StoreIOError, match=problem):
            transfer.pull(sm, rs, ["forged"])
        assert not sm.has_snapshot("forged")
    assert_fsck_clean(store)


# -- big directories' indexes -----------------------------------------------------------------
def test_a_superroot_that_is_an_index_is_refused(tmp_path):
    """Only a listing has the one entry, named '', a snapshot's root is looked up under: an
    index there was taken without the root's rules and ended the pull in KeyError b''."""
    page = _listing(b"a")
    forged = _index(_tid(page))
    _refused(
        tmp_path,
        "root",
        f"remote r .*: tree {_tid(forged).hex()} is a big directory's "
        r"index, no snapshot root \(one entry, named ''\)",
        lambda rs: _forge(rs, _tid(forged), [page, forged]),
    )


def test_an_index_whose_page_is_an_index_is_refused(tmp_path):
    """The store reads an index's pages as listings: an index as a page was pulled and the
    snapshot recorded, then every read of the directory (and its layer) was EIO; a chain of
    thousands of them ended the pull in RecursionError."""
    page = _listing(b"a")
    inner = _index(_tid(page))
    outer = _index(_tid(inner))
    problem = f"tree {_tid(outer).hex()}: page {_tid(inner).hex()} is an index, which the store"
    _refused(
        tmp_path,
        "nested",
        problem,
        lambda rs: _forge_directory(rs, _tid(outer), [page, inner, outer], (1, 5, 0)),
    )
    chain = [page, _index(_tid(page))]
    for _ in range(3000):  # deeper than Python's recursion limit
        chain.append(_index(_tid(chain[-1])))
    _refused(
        tmp_path,
        "chain",
        "page [0-9a-f]{64} is an index, which the store does not read",
        lambda rs: _forge_directory(rs, _tid(chain[-1]), chain, (1, 5, 0)),
    )


def test_an_index_whose_page_is_an_index_here_is_refused(tmp_path):
    """A page the pulling store has already is held to the same rule: the store's own big
    directories' indexes are trees too."""
    (tmp_path / "src" / "big").mkdir(parents=True)
    for i in range(100):
        (tmp_path / "src" / "big" / f"f{i:03}").write_bytes(b"x")
    here: dict[str, bytes] = {}

    def have(sm) -> None:
        sm.import_tree(tmp_path / "src", "mine")
        big = sm.read_tree(sm.root_entry("mine").ref)[b"big"]
        assert index_pages(stored_payload(sm.trees.content.get(big.ref))) is not None
        here["big"] = big.ref

    def forge(rs) -> None:
        outer = _index(here["big"])
        _forge_directory(rs, _tid(outer), [outer], (100, 100, 0))

    _refused(
        tmp_path,
        "here",
        "page [0-9a-f]{64} is an index, which the store does not read",
        forge,
        have,
    )


def test_an_index_is_paged_as_the_store_pages(tmp_path):
    """The store merges an index's pages into one listing: a name in two pages counted twice
    in the totals summed over the pages, though the directory shows it once, so a directory
    entry could claim files the snapshot does not hold. Pages as the store cuts them are
    listings of one name at least, in name order through the pages, none twice; an index
    has one page at least, and its bytes are whole page ids."""
    ab, bc, cd = _listing(b"a", b"b"), _listing(b"b", b"c"), _listing(b"c", b"d")
    empty = bytes([FORMAT_VERSION])
    # b then a: two listings' encodings run together
    unsorted = encode_tree({b"b": _hello(b"b")}) + encode_tree({b"a": _hello(b"a")})[1:]
    cases = {
        # totals summed over the pages: 4 files of 20 bytes, where the store reads 3 of 15
        "twice": (
            [ab, bc],
            (4, 20, 0),
            f"page {_tid(bc).hex()} begins at 'b', not after 'b', where the page before it ends",
        ),
        "order": ([cd, ab], (4, 20, 0), f"page {_tid(ab).hex()} begins at 'a', not after 'd'"),
        "same page": ([ab, ab], (4, 20, 0), f"page {_tid(ab).hex()} begins at 'a', not after"),
        "empty page": ([empty, ab], (2, 10, 0), f"page {_tid(empty).hex()} holds no entry"),
        "unsorted": (
            [unsorted],
            (2, 10, 0),
            f"page {_tid(unsorted).hex()} holds its names out of order",
        ),
        "no pages": ([], (0, 0, 0), "is an index of no pages"),
    }
    for case, (pages, totals, problem) in cases.items():
        forged = _index(*(_tid(page) for page in pages))
        _refused(
            tmp_path,
            case,
            f"remote r .*: tree {_tid(forged).hex()}:? {problem}",
            lambda rs, pages=pages, forged=forged, totals=totals: _forge_directory(
                rs, _tid(forged), [*pages, forged], totals
            ),
        )
    cut = bytes([INDEX_VERSION]) + bytes(31)
    _refused(
        tmp_path,
        "cut",
        f"tree {_tid(cut).hex()} does not decode: tree index object is truncated",
        lambda rs: _forge_directory(rs, _tid(cut), [cut], (0, 0, 0)),
    )


def test_an_index_cut_elsewhere_than_here_is_pulled_and_read(tmp_path):
    """Where pages end is not held to this store's cut (which it lends to a commit only if
    it is its own): pages in order, pulled or here already, come through and read as one
    directory."""
    ab, c = _listing(b"a", b"b"), _listing(b"c")
    forged = _index(_tid(ab), _tid(c))
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    _forge_directory(rs, _tid(forged), [ab, c, forged], (3, 15, 0))
    (tmp_path / "src" / "big").mkdir(parents=True)
    for i in range(300):
        (tmp_path / "src" / "big" / f"f{i:03}").write_bytes(b"xy")
    with open_store(tmp_path / "store") as sm:
        assert transfer.pull(sm, rs, ["forged"]).snapshots == ["forged"]
        view = snapshot_view(sm, "forged")  # the root under b"", then what it holds
        assert {name: node.data for name, node in view.items()} == {
            b"": None,
            b"a": b"hello",
            b"b": b"hello",
            b"c": b"hello",
        }
        # some pages of a big directory of the store's own, in order and not
        sm.import_tree(tmp_path / "src", "mine")
        big = sm.read_tree(sm.root_entry("mine").ref)[b"big"].ref
        pages = index_pages(stored_payload(sm.trees.content.get(big)))
        assert pages is not None and len(pages) >= 3
        chosen = [pages[0], pages[2]]
        names = sorted(name for page in chosen for name in sm.read_tree(page))
        for id, order in {"some": chosen, "reversed": chosen[::-1]}.items():
            forged = _index(*order)
            _forge_directory(rs, _tid(forged), [forged], (len(names), 2 * len(names), 0), id=id)
        with pytest.raises(
            StoreIOError, match=f"page {chosen[0].hex()} begins at 'f000', not after 'f"
        ):
            transfer.pull(sm, rs, ["reversed"])
        assert not sm.has_snapshot("reversed")
        assert transfer.pull(sm, rs, ["some"]).snapshots == ["some"]
        assert sorted(snapshot_view(sm, "some")) == [b"", *names]
    assert_fsck_clean(tmp_path / "store")


# -- objects larger than any writer makes -----------------------------------------------------
class _CountedBody:
    """An S3 reply's body that notes the bytes read of it."""

    def __init__(self, body) -> None:
        self.body = body
        self.reads: list[int] = []

    def read(self, *amount: int) -> bytes:
        data = self.body.read(*amount)
        self.reads.append(len(data))
        return data

    def close(self) -> None:
        self.body.close()


@pytest.mark.parametrize("told", [True, False])
def test_an_object_over_the_bound_its_reader_gives_is_refused_unread(remote, monkeypatch, told):
    """``get`` read a whole object into memory, whatever its size. With ``max_bytes`` an
    object over it is EIO naming it, refused on the size its file or reply tells before it
    is read; an S3 reply that tells none is read one byte past the bound, no further."""
    if remote.scheme == "file" and not told:
        pytest.skip("a file's size is always told")
    rs = made_remote(remote)
    data = os.urandom(1000)
    rs.put("snapshots/s", data)
    assert rs.get("snapshots/s") == rs.get("snapshots/s", max_bytes=1000) == data
    bodies: list[_CountedBody] = []
    if remote.scheme == "s3":
        real = rs.client.get_object

        def get_object(**kw):
            reply = real(**kw)
            if not told:
                del reply["ContentLength"]
            bodies.append(_CountedBody(reply["Body"]))
            return {**reply, "Body": bodies[-1]}

        monkeypatch.setattr(rs.client, "get_object", get_object)
        assert rs.get("snapshots/s", max_bytes=1000) == data
        assert bodies.pop().reads == ([1000] if told else [1000, 0])  # read on to its end
    holds = "1000 bytes" if told else "more bytes"
    with pytest.raises(
        StoreIOError,
        match=rf"remote r \(.*\): snapshots/s holds {holds}, more "
        "than the 500 it may hold",
    ):
        rs.get("snapshots/s", max_bytes=500)
    if remote.scheme == "s3":
        assert bodies.pop().reads == ([] if told else [501])


def test_a_big_file_in_a_directory_remote_is_refused_on_its_size(tmp_path):
    """A writer of the directory puts a file of 64 MiB (sparse: no disk taken) where a
    reader takes 1 MiB: refused on its fstat, not read."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    (tmp_path / "remote" / "locks").mkdir()
    with open(tmp_path / "remote" / "locks" / "exclusive-big", "wb") as f:
        f.truncate(64 << 20)
    with pytest.raises(
        StoreIOError,
        match=f"locks/exclusive-big holds {64 << 20} bytes, more than the {1 << 20} it may hold",
    ):
        rs.get("locks/exclusive-big", max_bytes=1 << 20)


def test_a_file_that_grows_after_its_fstat_is_read_to_its_end_or_past_the_bound(
    tmp_path, monkeypatch
):
    """A file read to one byte past the size its fstat told, which a writer of the directory
    may have made it outgrow since: then read on, whole, or one byte past the bound."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    data = os.urandom(1000)
    rs.put("snapshots/s", data)
    fstat = os.fstat

    def grown_since(fd):  # the file as it was before its last 990 bytes were written
        st = fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != 1000:
            return st
        return os.stat_result((*st[:6], 10, *st[7:10]))

    monkeypatch.setattr(objectstore.os, "fstat", grown_since)
    assert rs.get("snapshots/s", max_bytes=1000) == data
    with pytest.raises(StoreIOError, match="snapshots/s holds more bytes, more than the 500"):
        rs.get("snapshots/s", max_bytes=500)


def test_the_bounds_hold_what_this_version_writes():
    """A ref at the label limits, each label byte one JSON writes as six (a lone surrogate,
    ``\\udc80``), with the longest ids and an observation; a lock of the longest host name;
    a frame of incompressible bytes, at every size class zstd frames differ in."""
    labels = {f"k{i}": "\udc80" * (MAX_LABEL_VALUE_CHARS - 2) for i in range(8)}
    assert sum(len(k) + len(v) for k, v in labels.items()) == MAX_LABELS_BYTES
    assert check_labels(labels) == labels
    obs = Observation("ab" * 32, (1 << 63) - 1, 0o7777, (1 << 32) - 2, (1 << 32) - 2)
    ref = transfer.RemoteSnapshot(
        "i" * 128, "cd" * 32, "p" * 128, (1 << 63) - 1, labels, (1 << 63) - 1, (1 << 63) - 1, obs
    ).encode()
    assert 5 * MAX_LABELS_BYTES < len(ref) <= objectstore.REF_BYTES_MAX
    lock = json.dumps({"host": "\udc80" * 64, "pid": 1 << 22, "time": 1e10}).encode()
    assert len(lock) <= objectstore.LOCK_BYTES_MAX
    for size in (0, 1, 100, (128 << 10) - 1, 128 << 10, (128 << 10) + 1, 3 << 20):
        assert len(compress(os.urandom(size))) <= objectstore.frame_bytes_max(size), size
    assert objectstore.INDEX_BYTES_MAX > packs.INDEX_BODY_MAX
    assert objectstore.PACK_BYTES_MAX > packs.PACK_BODY_MAX


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def test_a_ref_or_an_index_larger_than_any_push_writes_is_refused_unread(tmp_path):
    """A ref padded with blanks past 1 MiB decoded as it was, after a read of all of it; an
    index key holding more bytes than an index may was read whole before its name was
    checked. Now both are EIO naming them, on their size."""
    rs = made_remote(config.RemoteSpec("r", f"file://{tmp_path}/remote"))
    page = _listing(b"a")
    _forge_directory(rs, _tid(page), [page], (1, 5, 0))
    ref = rs.get("snapshots/forged")
    assert transfer.read_ref(rs, "forged").root
    padded = ref + b" " * objectstore.REF_BYTES_MAX
    rs.put("snapshots/padded", padded.replace(b'"forged"', b'"padded"'))
    with pytest.raises(
        StoreIOError,
        match=f"snapshots/padded holds {len(padded)} bytes, more "
        f"than the {objectstore.REF_BYTES_MAX} it may",
    ):
        transfer.read_ref(rs, "padded")
    name = "ab" * 32
    _sparse(tmp_path / "remote" / "index" / name, objectstore.INDEX_BYTES_MAX + 1)
    with open_store(tmp_path / "store") as sm:
        with pytest.raises(
            StoreIOError, match=f"index/{name} holds {objectstore.INDEX_BYTES_MAX + 1} bytes, more"
        ):
            transfer.pull(sm, rs, ["forged"])
        assert not sm.has_snapshot("forged")


def test_a_pack_is_read_to_the_size_its_index_records(remote, tmp_path):
    """A pack is named by its hash and its index records its size: one larger is refused on
    its size, before it is read, and an index recording more than any pack may hold is held
    to that bound."""
    rs = made_remote(remote)
    page = _listing(b"a")
    _forge_directory(rs, _tid(page), [page], (1, 5, 0))
    (key,) = [listed.key for listed in rs.list("packs/")]
    pack = rs.get(key)
    rs.put(key, pack + bytes(10))
    with open_store(tmp_path / "store") as sm:
        with pytest.raises(
            StoreIOError,
            match=f"{key} holds {len(pack) + 10} bytes, more than the {len(pack)} it may hold",
        ):
            transfer.pull(sm, rs, ["forged"])
        assert not sm.has_snapshot("forged")
        rs.put(key, pack)
        assert transfer.pull(sm, rs, ["forged"]).snapshots == ["forged"]
    if remote.scheme != "file":
        return
    # an index that records a pack of 2**62 bytes, and a pack over the bound where it says
    oid = bytes(range(32))
    name = "cd" * 32
    index = packs.INDEX_MAGIC + compress(
        packs._INDEX_HEAD.pack(bytes.fromhex(name), 1 << 62) + packs._ENTRY.pack(b"T", oid, 100)
    )
    rs.put(packs.index_key(packs.name_of(index)), index)
    _sparse(tmp_path / "remote" / "packs" / name, objectstore.PACK_BYTES_MAX + 1)
    rs.put_new(
        transfer.ref_key("lying"),
        transfer.RemoteSnapshot("lying", oid.hex(), None, 0, {}, 0, 0).encode(),
    )
    with open_store(tmp_path / "other") as sm:
        most = objectstore.PACK_BYTES_MAX
        with pytest.raises(
            StoreIOError, match=f"packs/{name} holds {most + 1} bytes, more than the {most}"
        ):
            transfer.pull(sm, rs, ["lying"])
