"""The store's format number: what opens, what upgrades in place, what is refused."""

from __future__ import annotations

import json
import os
import signal
import stat
import struct

import lmdb
import pytest

from cascowfs import cas, catalog, overlay, trees
from cascowfs.errors import StoreIOError
from cascowfs.fsck import fsck_store
from cascowfs.metadb import LEGACY_DB_NAMES, MetaDB
from cascowfs.state import STORE_FORMAT, StateManager

from conftest import check_live, needs_overlay, open_store, register_store, run_child
from crash_scenarios import as_format_7
from support.store_formats import count_layers_by_chain


def _set_format(sm, value: bytes) -> None:
    sm.db.write(lambda txn: txn.put(b"format", value, db=sm.db.db("meta")))


def _format(sm) -> bytes:
    with sm.db.read() as txn:
        return bytes(txn.get(b"format", db=sm.db.db("meta")))


def _one_file_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    return src


def test_format_2_store_upgrades_in_place_and_keeps_its_snapshots(store, tmp_path):
    with open_store(store) as sm:
        sm.import_tree(_one_file_tree(tmp_path), "base")
        _set_format(sm, b"2")  # a store written before refcount changes were queued
    with open_store(store) as sm:
        assert _format(sm) == str(STORE_FORMAT).encode()
        tree = sm.create_branch("b", "base").tree
        assert (tree / "a.txt").read_text() == "hello\n"
        (tree / "a.txt").write_text("changed\n")
        sm.commit("b", "next")
        sm.discard("b")
        sm.prune("base")
        sm.settle()
        check_live(sm)


def test_format_5_store_with_plain_trees_upgrades_and_reads_them(store, tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(200):  # a paged directory: listings well above the compression threshold
        (src / "big" / f"file{i:03d}.c").write_text(f"{i}\n")
    with monkeypatch.context() as m:
        m.setattr(trees, "COMPRESS_ABOVE", 1 << 30)  # trees as format 5 stored them
        with open_store(store) as sm:
            sm.import_tree(src, "base")
            _set_format(sm, b"5")
            with sm.db.read() as txn:
                assert not [v for _, v in txn.cursor(db=sm.db.db("objects"))
                            if v[:1] == cas.TYPE_TREE and v[1] == trees.COMPRESSED]
    with open_store(store) as sm:
        assert _format(sm) == str(STORE_FORMAT).encode()
        tree = sm.create_branch("b", "base").tree
        assert sorted(os.listdir(tree / "big")) == sorted(os.listdir(src / "big"))
        (tree / "big" / "file007.c").write_text("changed\n")
        sm.commit("b", "next")
        assert [c.line() for c in sm.diff("base", "next")] == ["M big/file007.c"]
        with sm.db.read() as txn:  # the commit's new listings are compressed, the old plain
            kinds = {v[1] == trees.COMPRESSED for _, v in txn.cursor(db=sm.db.db("objects"))
                     if v[:1] == cas.TYPE_TREE}
        assert kinds == {True, False}
        sm.discard("b")
        sm.settle()
        check_live(sm, deep=True)


def test_unknown_format_is_refused_not_touched(store):
    with open_store(store) as sm:
        _set_format(sm, b"99")
    with pytest.raises(StoreIOError, match="format 99"):
        with open_store(store):
            pass


def _as_format_4_with_refcounts_and_garbage(store) -> bytes:
    """Rewrite a closed store as format 4 left it: object refcounts and a refcount queue in
    databases of their own, and (as a queued decrement would have left it) an object that no
    live root reaches. Returns that object's id."""
    db = MetaDB(store / "meta")
    try:
        def rewrite(txn):
            refs = db.env.open_db(b"refs", txn=txn)
            deferred = db.env.open_db(b"deferred", txn=txn)
            base_root = bytes.fromhex(json.loads(txn.get(b"base", db=db.db("snapshots")))["root"])
            txn.put(base_root, struct.pack("<Q", 1), db=refs)
            txn.put(b"-" + base_root, struct.pack("<Q", 1), db=deferred)
            prepared = cas.prepare_content(b"garbage left by a queued decrement " * 20)
            cas.ContentStore(db).put_objects(txn, prepared.objects)
            count_layers_by_chain(db, txn)
            txn.put(b"format", b"4", db=db.db("meta"))
            return prepared.content_id

        return db.write(rewrite)
    finally:
        db.close()


def test_format_4_refcounts_are_dropped_and_its_garbage_collected(store, tmp_path):
    with open_store(store) as sm:
        sm.import_tree(_one_file_tree(tmp_path), "base")
        sm.create_branch("b", "base")
        sm.settle()
    garbage = _as_format_4_with_refcounts_and_garbage(store)
    report = fsck_store(store)  # read-only: the old format's garbage counts as pending
    assert report.awaiting_collection >= 1
    assert not [p for p in report.problems if not p.startswith("invariant 4")], report.problems
    with open_store(store) as sm:
        assert _format(sm) == str(STORE_FORMAT).encode()
        with sm.db.read() as txn:
            for name in LEGACY_DB_NAMES:
                with pytest.raises(lmdb.NotFoundError):
                    sm.db.env.open_db(name, txn=txn, create=False)
        sm.settle()
        with sm.db.read() as txn:
            assert txn.get(garbage, db=sm.db.db("objects")) is None
        assert (sm.branch("b").tree / "a.txt").read_text() == "hello\n"
        check_live(sm)
        sm.discard("b")
        sm.prune("base")
        sm.settle()
        check_live(sm)
        with sm.db.read() as txn:
            assert sum(1 for _ in sm.content.iter_object_ids(txn)) == 0


def test_every_record_a_lineage_writes_reads_back_byte_for_byte(store, tmp_path):
    """The catalog writes records exactly as earlier versions did (sorted JSON keys, no
    spaces, the same keys), so a store written before it opens and reads the same."""
    with open_store(store) as sm:
        sm.import_tree(_one_file_tree(tmp_path), "base", {"k": "v"})
        tree = sm.create_branch("b", "base").tree
        (tree / "new").write_text("new\n")
        sm.commit("b", "c1")
        with sm.db.read() as txn:
            for name, decode, encode in (
                    ("snapshots", catalog.decode_snapshot, catalog.encode_snapshot),
                    ("branches", catalog.decode_branch, catalog.encode_branch),
                    ("layers", catalog.decode_layer, catalog.encode_layer)):
                for key, raw in txn.cursor(db=sm.db.db(name)):
                    raw = bytes(raw)
                    assert raw == json.dumps(json.loads(raw), separators=(",", ":"),
                                             sort_keys=True).encode(), (name, key)
                    assert encode(decode(raw)) == raw, (name, key)
        sm.discard("b")
def test_format_6_store_with_zero_chunks_upgrades_and_its_layers_get_holes(store, tmp_path,
                                                                          monkeypatch):
    from cascowfs import extents, layers

    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(5000) + bytes(40 * cas.HOLE_BLOCK) + os.urandom(7)
    (src / "zeros").write_bytes(data)
    with monkeypatch.context() as m:
        for module in (cas, extents):  # zeros as format 6 stored them: chunks like any data
            m.setattr(module, "zero_runs", lambda pieces: iter(pieces))
        with open_store(store) as sm:
            sm.import_tree(src, "base")
            old_ref = sm.read_tree(sm.root_entry("base").ref)[b"zeros"].ref
            _set_format(sm, b"6")
    assert old_ref != cas.identify_content(data).content_id
    with open_store(store) as sm:
        assert _format(sm) == str(STORE_FORMAT).encode()
        assert sm.read_file(old_ref, 0, len(data) + 1) == data
        out = tmp_path / "rebuilt"
        layers.materialize(sm.trees, sm.content, sm.root_entry("base"), out)
        assert (out / "zeros").read_bytes() == data
        assert os.stat(out / "zeros").st_blocks * 512 < len(data) // 4  # zero chunks skipped
        tree = sm.create_branch("b", "base").tree
        (tree / "zeros").write_bytes(data)  # the same bytes written again: the new id
        sm.commit("b", "next")
        assert sm.read_tree(sm.root_entry("next").ref)[b"zeros"].ref == \
            cas.identify_content(data).content_id
        sm.discard("b")
        sm.settle()
        check_live(sm, deep=True)


# ----------------------------------------------------------------------------------------
# format 8: a branch's upper and work directories move into its private directory
# ----------------------------------------------------------------------------------------
UPGRADE = """
import sys
from cascowfs.state import StateManager
StateManager.open(sys.argv[1], create=False).close()
"""


def _two_branches_with_changes(store, tmp_path) -> None:
    """Two branches of one snapshot with a file each, left mounted as a daemon leaves them."""
    sm = StateManager.open(register_store(store))
    try:
        sm.import_tree(_one_file_tree(tmp_path), "base")
        for name in ("b1", "b2"):
            tree = sm.create_branch(name, "base").tree
            (tree / f"{name}.txt").write_text(f"uncommitted in {name}\n")
            os.chmod(tree, 0o755)
        sm.settle()
    finally:
        sm.close()


@needs_overlay
@pytest.mark.parametrize("killed_after_moves", [0, 1])
def test_format_7_branches_move_their_uppers_into_private_dirs(store, tmp_path,
                                                               killed_after_moves):
    """Mounted branches of a format 7 store keep their uncommitted files through the upgrade,
    also when the upgrading process is killed -9 after moving one branch's upper; afterwards
    every upper is private and mounted from there."""
    _two_branches_with_changes(store, tmp_path)
    as_format_7(store)
    assert fsck_store(store).problems == []  # read as format 7 lays its branches out
    if killed_after_moves:
        child = run_child(UPGRADE, str(store), crash_at="upgrade.moved")
        assert child.returncode == -signal.SIGKILL, child.stderr
        moved = [n for n in ("b1", "b2") if (store / "branches" / n / "private" / "upper").is_dir()]
        assert moved == ["b1"]
    with open_store(store) as sm:
        assert _format(sm) == str(STORE_FORMAT).encode()
        for name in ("b1", "b2"):
            bdir = store / "branches" / name
            assert sorted(os.listdir(bdir)) == ["private", "tree"]
            assert stat.S_IMODE(os.lstat(bdir / "private").st_mode) == 0o700
            assert sorted(os.listdir(bdir / "private")) == ["upper", "work"]
            assert stat.S_IMODE(os.lstat(bdir / "tree").st_mode) == 0o755  # the tree's own
            assert (sm.branch(name).tree / f"{name}.txt").read_text() == (
                f"uncommitted in {name}\n")
            [mount] = [m for m in overlay.all_mounts() if m.target == str(bdir / "tree")]
            assert overlay.overlay_dirs(mount).upper == str(bdir / "private" / "upper")
            assert [c.path for c in sm.status(name)] == [f"{name}.txt"]
        sm.commit("b1", "c1")
        assert [c.line() for c in sm.diff("base", "c1")] == ["A b1.txt"]
        check_live(sm)
        sm.discard("b1")
        sm.discard("b2")
    assert fsck_store(store).problems == []
