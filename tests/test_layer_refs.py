"""Layer refcounts kept per chain node (``layer_refs.py``): against a model of the records
that stack chains, on a real LMDB; and the upgrade of a store whose layers counted chains."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from cascowfs.catalog import Catalog, LayerRecord
from cascowfs.errors import StoreIOError
from cascowfs.fsck import fsck_store
from cascowfs.layer_refs import LayerRefs, chain_key, recount
from cascowfs.metadb import MetaDB
from cascowfs.state import STORE_FORMAT

from conftest import check_live, hypothesis_settings, needs_overlay, open_store
from support.store_formats import count_layers_by_chain

TOP = "ab" * 32


class Store:
    """A catalog whose records stack chains, and what ``LayerRefs`` did to it."""

    def __init__(self, db: MetaDB) -> None:
        self.db = db
        self.catalog = Catalog(db.dbs)
        self.garbage_noted = 0
        self.refs = LayerRefs(self.catalog, self._note_garbage)

    def _note_garbage(self, txn) -> None:
        self.garbage_noted += 1

    def stack(self, chain: list[str]) -> None:
        """Record the layers of ``chain`` not recorded yet (as a commit or a merge records
        its new layer), and hold it."""

        def apply(txn):
            for lid in chain:
                if self.catalog.find_layer(txn, lid) is None:
                    self.catalog.put_layer(txn, lid, LayerRecord(refs=0, top=TOP, span=1))
            self.refs.hold(txn, chain)

        self.db.write(apply)

    def unstack(self, chain: list[str]) -> list[str]:
        return self.db.write(lambda txn: self.refs.release(txn, chain))

    def counts(self) -> tuple[dict[bytes, int], dict[str, int]]:
        with self.db.read() as txn:
            nodes = self.catalog.chain_nodes(txn)
            layers = {lid: rec.refs for lid, rec in self.catalog.layers(txn)}
        return nodes, layers


layer_ids = st.sampled_from(["L0", "L1", "L2", "L3", "L4", "L5"])
chains = st.lists(layer_ids, max_size=5, unique=True)
steps = st.lists(st.one_of(
    st.tuples(st.just("stack"), st.integers(0, 5), chains),  # a branch, commit, merge, rebase
    st.tuples(st.just("drop"), st.integers(0, 5))), max_size=20)  # a discard or a prune


@hypothesis_settings(80)
@given(steps=steps)
def test_counts_follow_every_chain_stacked_and_dropped(db, steps):
    """After each step the stored counts are a recount from scratch (fsck's comparison),
    exactly the layers no live chain names any more were dropped, and only they."""
    store = Store(db)
    db.write(lambda txn: (txn.drop(db.dbs["layers"], delete=False), store.catalog.clear_chains(txn)))
    records: dict[int, list[str]] = {}
    for step in steps:
        before = {lid for chain in records.values() for lid in chain}
        dropped: list[str] = []
        noted = store.garbage_noted
        if step[0] == "stack":  # hold the new chain before releasing the old, as a rebase does
            _, record, chain = step
            store.stack(chain)
            if record in records:
                dropped = store.unstack(records[record])
            records[record] = chain
        elif step[1] in records:
            dropped = store.unstack(records.pop(step[1]))
        live = {lid for chain in records.values() for lid in chain}
        assert sorted(dropped) == sorted(before - live)
        assert (store.garbage_noted > noted) == bool(dropped)
        nodes, layers = recount(records.values())
        assert store.counts() == (dict(nodes), dict(layers))


def test_holding_a_chain_that_has_a_node_touches_that_node_alone(db):
    store = Store(db)
    chain = [f"L{i}" for i in range(8)]
    store.stack(chain)
    nodes, layers = store.counts()
    assert len(nodes) == 8 and set(layers.values()) == {1}
    store.stack(chain)  # a second branch of the same snapshot
    after, layers_after = store.counts()
    assert layers_after == layers
    assert {k: v for k, v in after.items() if nodes[k] != v} == {chain_key(chain): 2}
    store.stack(["M"] + chain)  # a commit on it: one new node, its layer, the node below
    nodes, layers = store.counts()
    assert nodes[chain_key(chain)] == 3 and layers["M"] == 1 and layers["L0"] == 1
    assert store.unstack(chain) == [] and store.unstack(chain) == []
    assert store.unstack(["M"] + chain) == ["M"] + chain
    assert store.counts() == ({}, {})


def test_releasing_a_chain_not_held_raises_and_changes_nothing(db):
    store = Store(db)
    store.stack(["L1", "L0"])
    with pytest.raises(StoreIOError, match="the chain L2 L0 is released but not held"):
        store.unstack(["L2", "L0"])
    with pytest.raises(StoreIOError, match="the chain L1 L0 is released but not held"):
        db.write(lambda txn: (store.refs.release(txn, ["L1", "L0"]),
                              store.refs.release(txn, ["L1", "L0"])))
    nodes, layers = recount([["L1", "L0"]])
    assert store.counts() == (dict(nodes), dict(layers))
    with pytest.raises(StoreIOError, match="layer L9 is named by a chain but has no record"):
        db.write(lambda txn: store.refs.hold(txn, ["L9", "L1", "L0"]))
    assert store.counts() == (dict(nodes), dict(layers))


@needs_overlay
def test_a_store_whose_layers_counted_chains_upgrades_to_chain_nodes(store, tmp_path):
    """Format 10 counted, per layer, the chains naming it: fsck reads such a store as it was
    counted, and the first writable open recounts it into chain nodes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    with open_store(store) as sm:
        sm.import_tree(src, "base")
        for name in ("b1", "b2"):
            tree = sm.create_branch(name, "base").tree
            (tree / "a.txt").write_text(f"{name}\n")
        sm.commit("b1", "c1")
        sm.create_branch("b3", "c1")
        sm.settle()
        sm.db.write(lambda txn: (count_layers_by_chain(sm.db, txn),
                                 sm.catalog.set_format(txn, 10)))
        with sm.db.read() as txn:  # counted so, the base's layer differs from its node count
            assert sm.catalog.layer(txn, sm.catalog.snapshot(txn, "base").layers[0]).refs == 5
    report = fsck_store(store)  # the branches' mounts went with the store's closing
    assert [p for p in report.problems if "is not mounted" not in p] == []
    with open_store(store) as sm:
        with sm.db.read() as txn:
            assert sm.catalog.format(txn) == str(STORE_FORMAT).encode()
        check_live(sm)  # the counts are chain nodes' now
        for name in ("b3", "b1", "b2"):
            sm.discard(name)
        sm.prune("c1")
        sm.prune("base")
        sm.settle()
        with sm.db.read() as txn:
            assert sm.catalog.chain_nodes(txn) == {} and not list(sm.catalog.layers(txn))
    report = fsck_store(store)
    assert report.ok, report.problems
