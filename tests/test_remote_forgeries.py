"""A remote that forges what a push never writes: big directories' indexes (paged listings)
that the store could not read as pulled. Each refused with EIO naming the object, nothing
recorded. Against a real directory, as tests/test_remotes.py."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from conftest import assert_fsck_clean, open_store, snapshot_view
from test_remotes import _dir, made_remote
from cascowfs.cas import prepare_content
from cascowfs.codec import TYPE_TREE, object_id
from cascowfs.errors import StoreIOError
from cascowfs.model import Entry
from cascowfs.remote import config, packs, transfer
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
