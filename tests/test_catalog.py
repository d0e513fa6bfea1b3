"""The catalog's typed records: each round-trips, and reads and writes the bytes earlier
versions wrote (same JSON keys, sorted, no spaces), so no store format change is needed."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, strategies as st

from cascowfs import catalog
from cascowfs.catalog import BranchRecord, Catalog, Counter, LayerRecord, SnapshotRecord
from cascowfs.errors import NotFoundError, StoreIOError

from conftest import hypothesis_settings

# Records as format 6 stores hold them (written by the version before the catalog existed).
ROOT_A = "157ba857e6a4bd217d47b287bb376eef953be5a5e69d546e4cfacec7a973d8b3"
ROOT_B = "2b83876c4711ca9d1b90d119c581f0b7e87103673eaa964435938a7b76ca9fbf"
ROOT_C = "58d26110583214eb1adb68fc3cf504d5134dbf04c3eb1c23861cd731bf0ec8d1"
STORED_SNAPSHOTS = {
    "base": b'{"created_ns":1796481695512835427,"files":1,"labels":{"k":"v"},'
            b'"layers":["4d2e973948"],"parent":null,"root":"' + ROOT_A.encode() + b'","size":3}',
    "c2": b'{"created_ns":1796481695547543109,"files":3,"labels":{},"layers":["24c8a6ee04",'
          b'"46d75c907b","4d2e973948"],"parent":"c1","root":"' + ROOT_C.encode() + b'","size":5}',
}
STORED_BRANCH = (b'{"base_root":"' + ROOT_A.encode() + b'","created_ns":1796481695520668568,'
                 b'"last_commit":"c2","layers":["4d2e973948"],"parent":"c2"}')
STORED_LAYERS = {
    "24c8a6ee04": b'{"below":"' + ROOT_B.encode() + b'","built":false,"refs":1,"seq":0,"span":1,'
                  b'"top":"' + ROOT_C.encode() + b'"}',
    "46d75c907b": b'{"refs":2,"seq":2,"span":1,"top":"' + ROOT_B.encode() + b'"}',
    "4d2e973948": b'{"refs":4,"seq":1,"span":0,"top":"' + ROOT_A.encode() + b'"}',
}

hexids = st.binary(min_size=32, max_size=32).map(bytes.hex)
layer_ids = st.binary(min_size=5, max_size=5).map(bytes.hex)
names = st.text(min_size=1, max_size=20)
ns = st.integers(min_value=0, max_value=2**63 - 1)
counts = st.integers(min_value=0, max_value=2**40)


def test_records_as_stored_before_read_and_write_back_byte_for_byte():
    for raw in STORED_SNAPSHOTS.values():
        assert catalog.encode_snapshot(catalog.decode_snapshot(raw)) == raw
    assert catalog.encode_branch(catalog.decode_branch(STORED_BRANCH)) == STORED_BRANCH
    for raw in STORED_LAYERS.values():
        assert catalog.encode_layer(catalog.decode_layer(raw)) == raw


def test_records_as_stored_before_decode_to_their_fields():
    base = catalog.decode_snapshot(STORED_SNAPSHOTS["base"])
    assert base == SnapshotRecord(root=ROOT_A, parent=None, created_ns=1796481695512835427,
                                  layers=["4d2e973948"], files=1, size=3, labels={"k": "v"})
    branch = catalog.decode_branch(STORED_BRANCH)
    assert (branch.parent, branch.last_commit, branch.base_root) == ("c2", "c2", ROOT_A)
    unbuilt = catalog.decode_layer(STORED_LAYERS["24c8a6ee04"])
    assert (unbuilt.built, unbuilt.below, unbuilt.seq, unbuilt.span) == (False, ROOT_B, 0, 1)
    full = catalog.decode_layer(STORED_LAYERS["4d2e973948"])
    assert (full.built, full.below, full.refs, full.span) == (True, None, 4, 0)


def test_a_snapshot_record_without_labels_reads_as_unlabelled():
    raw = (b'{"created_ns":1,"files":0,"layers":[],"parent":null,"root":"' + ROOT_A.encode()
           + b'","size":0}')
    assert catalog.decode_snapshot(raw).labels == {}


@hypothesis_settings(200)
@given(root=hexids, parent=st.none() | names, created=ns, layers=st.lists(layer_ids, max_size=8),
       files=counts, size=counts, labels=st.dictionaries(names, st.text(max_size=30), max_size=4))
def test_snapshot_records_round_trip(root, parent, created, layers, files, size, labels):
    rec = SnapshotRecord(root=root, parent=parent, created_ns=created, layers=layers,
                         files=files, size=size, labels=labels)
    raw = catalog.encode_snapshot(rec)
    assert catalog.decode_snapshot(raw) == rec
    assert catalog.encode_snapshot(catalog.decode_snapshot(raw)) == raw


@hypothesis_settings(200)
@given(parent=st.none() | names, base=st.none() | hexids, layers=st.lists(layer_ids, max_size=8),
       created=ns, last=st.none() | names)
def test_branch_records_round_trip(parent, base, layers, created, last):
    rec = BranchRecord(parent=parent, base_root=base, layers=layers, created_ns=created,
                       last_commit=last)
    raw = catalog.encode_branch(rec)
    assert catalog.decode_branch(raw) == rec


@hypothesis_settings(200)
@given(refs=counts, top=hexids, span=counts, seq=counts, built=st.booleans(),
       below=st.none() | hexids)
def test_layer_records_round_trip_and_only_unbuilt_ones_carry_built_and_below(
        refs, top, span, seq, built, below):
    rec = LayerRecord(refs=refs, top=top, span=span, seq=seq, built=built,
                      below=None if built else below)
    raw = catalog.encode_layer(rec)
    assert catalog.decode_layer(raw) == rec
    assert (b'"built"' in raw) == (not built)
    assert (b'"below"' in raw) == (not built)


def test_records_put_in_a_transaction_read_back_and_go(db):
    cat = Catalog(db.dbs)
    snap = catalog.decode_snapshot(STORED_SNAPSHOTS["base"])
    branch = catalog.decode_branch(STORED_BRANCH)
    layer = catalog.decode_layer(STORED_LAYERS["24c8a6ee04"])

    def put(txn):
        cat.put_snapshot(txn, "base", snap)
        cat.put_branch(txn, "b", branch)
        cat.put_layer(txn, "24c8a6ee04", layer)

    db.write(put)
    with db.read() as txn:
        assert cat.snapshot(txn, "base") == snap and cat.has_snapshot(txn, "base")
        assert list(cat.snapshots(txn)) == [("base", snap)] and cat.snapshot_count(txn) == 1
        assert cat.branch(txn, "b") == branch and cat.branch_names(txn) == ["b"]
        assert cat.layer(txn, "24c8a6ee04") == layer
        assert cat.layer_ids(txn) == {"24c8a6ee04"}
        assert cat.unbuilt_layer_ids(txn) == ["24c8a6ee04"]
        assert set(cat.live_roots(txn)) == {bytes.fromhex(h) for h in (ROOT_A, ROOT_B, ROOT_C)}
        raw = txn.get(b"base", db=db.db("snapshots"))
        assert bytes(raw) == STORED_SNAPSHOTS["base"]

    def delete(txn):
        cat.delete_snapshot(txn, "base", cat.find_snapshot(txn, "base"))
        cat.delete_branch(txn, "b")
        cat.delete_layer(txn, "24c8a6ee04")

    db.write(delete)
    with db.read() as txn:
        with pytest.raises(NotFoundError, match="no snapshot 'base'"):
            cat.snapshot(txn, "base")
        with pytest.raises(NotFoundError, match="no branch 'b'"):
            cat.branch(txn, "b")
        assert cat.find_branch(txn, "b") is None and cat.find_layer(txn, "24c8a6ee04") is None
        with pytest.raises(StoreIOError, match="layer 24c8a6ee04 has no record"):
            cat.layer(txn, "24c8a6ee04")
        assert not list(cat.live_roots(txn))


def test_counters_start_at_zero_and_meta_values_persist(db):
    cat = Catalog(db.dbs)
    with db.read() as txn:
        assert all(cat.counter(txn, c) == 0 for c in Counter)
        assert cat.format(txn) is None and cat.page_cache(txn) == ""

    def put(txn):
        for value, c in enumerate(Counter, start=1):
            cat.set_counter(txn, c, value * 1000)
        cat.set_format(txn, 6)
        cat.set_page_cache(txn, "boot/mount 1")

    db.write(put)
    with db.read() as txn:
        assert [cat.counter(txn, c) for c in Counter] == [1000, 2000, 3000, 4000]
        assert cat.format(txn) == b"6" and cat.page_cache(txn) == "boot/mount 1"
        assert bytes(txn.get(b"layer_seq", db=db.db("meta"))) == b"1000"  # decimal text


def test_applied_marks_are_kept_until_forgotten(db):
    cat = Catalog(db.dbs)
    db.write(lambda txn: cat.mark_applied(txn, "op1"))
    with db.read() as txn:
        assert cat.is_applied(txn, "op1") and not cat.is_applied(txn, "op2")
    db.write(cat.forget_applied)
    with db.read() as txn:
        assert not cat.is_applied(txn, "op1")


index_ids = st.sampled_from(["a", "b", "c"])
index_labels = st.dictionaries(st.sampled_from(["visits", "value", "reward"]),
                               st.sampled_from(["1", "2", "0.5", "x"]), max_size=3)
index_steps = st.lists(st.one_of(
    st.tuples(st.just("put"), index_ids, st.none() | st.sampled_from(["a", "b", "z"]),
              index_labels),
    st.tuples(st.just("relabel"), index_ids, index_labels),
    st.tuples(st.just("delete"), index_ids)), max_size=12)


@hypothesis_settings(60)
@given(steps=index_steps)
def test_indexes_follow_every_put_relabel_and_delete(db, steps):
    """Indexes rewritten by difference stay right: after every put, relabel and delete they
    say exactly what the records say (fsck's own comparison) and answer as a model does."""
    cat = Catalog(db.dbs)

    def empty(txn):
        for name in ("snapshots", "children", "labels", "label_order"):
            txn.drop(db.dbs[name], delete=False)

    db.write(empty)
    model: dict[str, SnapshotRecord] = {}
    for step in steps:
        kind, id = step[0], step[1]
        if kind == "put":
            rec = SnapshotRecord(root=ROOT_A, parent=step[2], created_ns=1, layers=[], files=0,
                                 size=0, labels=step[3])
            db.write(lambda txn: cat.put_snapshot(txn, id, rec))
            model[id] = rec
        elif kind == "relabel":
            labels = step[2]
            def relabel(txn) -> bool:  # as a label's transaction does it
                old = cat.find_snapshot(txn, id)
                if old is not None:
                    cat.replace_snapshot(txn, id, old, replace(old, labels=labels))
                return old is not None

            assert db.write(relabel) == (id in model)
            if id in model:
                model[id] = replace(model[id], labels=labels)
        else:
            db.write(lambda txn: cat.delete_snapshot(txn, id, cat.find_snapshot(txn, id)))
            model.pop(id, None)
        with db.read() as txn:
            assert cat.index_mismatches(txn) == []
            for parent in (None, "a", "b", "z"):
                assert cat.children(txn, parent) == sorted(
                    i for i, r in model.items() if r.parent == parent)
            for key in ("visits", "value", "reward"):
                assert list(cat.labelled(txn, key)) == sorted(
                    (i, r.labels[key]) for i, r in model.items() if key in r.labels)
