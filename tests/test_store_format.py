"""The store's format number: what opens, what upgrades in place, what is refused."""

from __future__ import annotations

import json
import struct

import pytest

from cascowfs.errors import StoreIOError
from cascowfs.metadb import MetaDB
from cascowfs.state import STORE_FORMAT, StateManager

from conftest import check_live, open_store


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


def test_unknown_format_is_refused_not_touched(store):
    with open_store(store) as sm:
        _set_format(sm, b"99")
    with pytest.raises(StoreIOError, match="format 99"):
        with open_store(store):
            pass


def _as_format_3_with_a_queued_increment(store) -> tuple[bytes, int]:
    """Rewrite a closed store as format 3 left it with one increment still queued: the branch's
    reference to its base, taken out of the count and put in the old, sequence-keyed queue."""
    db = MetaDB(store / "meta")
    try:
        def rewrite(txn):
            base_root = bytes.fromhex(json.loads(txn.get(b"b", db=db.db("branches")))["base_root"])
            count = struct.unpack("<Q", txn.get(base_root, db=db.db("refs")))[0]
            txn.put(base_root, struct.pack("<Q", count - 1), db=db.db("refs"))
            txn.put(struct.pack(">Q", 0), b"+" + base_root, db=db.db("deferred"))
            txn.put(b"format", b"3", db=db.db("meta"))
            return base_root, count

        return db.write(rewrite)
    finally:
        db.close()


def test_format_3_queue_is_rekeyed_on_upgrade(store, tmp_path):
    with open_store(store) as sm:
        sm.import_tree(_one_file_tree(tmp_path), "base")
        sm.create_branch("b", "base")
        sm.settle()
    base_root, count = _as_format_3_with_a_queued_increment(store)
    with pytest.raises(StoreIOError, match="format 3 with queued refcount changes"):
        StateManager.open(store, recover=False)  # fsck's read-only open cannot rekey
    with open_store(store) as sm:
        assert _format(sm) == str(STORE_FORMAT).encode()
        sm.settle()
        with sm.db.read() as txn:
            assert sm.content.deferred_count(txn) == 0
            assert sm.content.refcount(txn, base_root) == count
        check_live(sm)
        sm.discard("b")
        sm.prune("base")
        sm.settle()
        check_live(sm)
