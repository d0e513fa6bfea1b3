"""The store's format number: what opens, what upgrades in place, what is refused."""

from __future__ import annotations

import pytest

from cascowfs.errors import StoreIOError
from cascowfs.state import STORE_FORMAT

from conftest import check_live, open_store


def _set_format(sm, value: bytes) -> None:
    sm.db.write(lambda txn: txn.put(b"format", value, db=sm.db.db("meta")))


def _format(sm) -> bytes:
    with sm.db.read() as txn:
        return bytes(txn.get(b"format", db=sm.db.db("meta")))


def test_format_2_store_upgrades_in_place_and_keeps_its_snapshots(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    with open_store(store) as sm:
        sm.import_tree(src, "base")
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
