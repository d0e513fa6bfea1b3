"""find, children and the catalog's indexes behind them, on snapshot records written straight
into a catalog (no mounts): every answer equals a brute-force reading of the records, whatever
the labels, the tree's shape and the query; hostile predicates and options are EINVAL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from cascowfs.catalog import AFTER_TEXT, TEXT_TAG, Catalog, Observation, SnapshotRecord, sort_bytes
from cascowfs import episodes
from cascowfs.episodes import (MAX_PREDICATES, FindQuery, Predicate, descendants, find,
                               label_matcher, parse_find, parse_predicate)
from cascowfs.errors import InvalidArgumentError, NotFoundError
from cascowfs.metadb import MetaDB
from cascowfs.names import LABEL_NUMBER_RE as NUMBER_RE
from cascowfs.names import check_labels, parse_labels
from cascowfs.wire import parse_command

from conftest import hypothesis_settings

pytestmark = pytest.mark.unit
ROOT = "00" * 32


@pytest.fixture
def catalog(tmp_path: Path):
    db = MetaDB(tmp_path / "meta")
    try:
        yield db, Catalog(db.dbs)
    finally:
        db.close()


def _record(parent: str | None, labels: dict[str, str], obs: bool = False, n: int = 0):
    return SnapshotRecord(root=ROOT, parent=parent, created_ns=n, layers=[], files=0, size=0,
                          labels=labels, obs=Observation("", 0, 0o644, 0, 0) if obs else None)


# ----------------------------------------------------------------------------------------
# a reference reading of the records
# ----------------------------------------------------------------------------------------
def _num(text):
    return float(text) if NUMBER_RE.fullmatch(text) else None


def _reference(records: dict[str, SnapshotRecord], q: FindQuery) -> list[str]:
    def below(top):
        out, todo = set(), [top]
        while todo:
            cur = todo.pop()
            for sid, rec in records.items():
                if rec.parent == cur and sid not in out:
                    out.add(sid)
                    todo.append(sid)
        return out

    def holds(p: Predicate, sid: str) -> bool:
        if p.key == "obs" and p.op is None:
            return records[sid].obs is not None
        val = records[sid].labels.get(p.key)
        if val is None:
            return False
        if p.op is None:
            return True
        a, b = _num(val), _num(p.value)
        left, right = (a, b) if a is not None and b is not None else (val, p.value)
        return {"=": left == right, "!=": left != right, "<": left < right,
                "<=": left <= right, ">": left > right, ">=": left >= right}[p.op]

    ids = sorted(records)
    if q.parent is not None:
        ids = [i for i in ids if records[i].parent == q.parent]
    if q.ancestor is not None:
        ids = sorted(below(q.ancestor))
    ids = [i for i in ids if all(holds(p, i) for p in q.predicates)]
    if q.sort is not None:
        def key(i):
            val = records[i].labels.get(q.sort)
            if val is None:
                return (2, 0, "", i)
            n = _num(val)
            if n is not None:
                return (0, -n if q.descending else n, "", i)
            return (1, 0, val, i)
        nums = sorted((i for i in ids if key(i)[0] == 0), key=key)
        texts = sorted((i for i in ids if key(i)[0] == 1), key=lambda i: i)
        texts = sorted(texts, key=lambda i: records[i].labels[q.sort], reverse=q.descending)
        missing = sorted(i for i in ids if key(i)[0] == 2)
        ids = nums + texts + missing
    return ids if q.limit is None else ids[: q.limit]


# ----------------------------------------------------------------------------------------
# strategies: a snapshot tree with labels from a small alphabet, so that queries hit
# ----------------------------------------------------------------------------------------
KEYS = st.sampled_from(["reward", "visits", "action", "a.b", "_x"])
VALUES = st.one_of(st.sampled_from(["0", "0.5", "1", "-2", "1e3", "fix-parser", "Z", "", "10",
                                    "+.5", "nan", "inf", "0x10", " 1"]),
                   st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")),
                           max_size=6),
                   # values whose sort bytes an order key cannot keep whole (ORDER_KEPT)
                   st.builds(lambda n, tail: "q" * n + tail, st.sampled_from([298, 299, 300, 420]),
                             st.sampled_from(["", "a", "b", "ab", "\u00e9", "!", "q"])),
                   st.sampled_from(["1" + "0" * 400, "9" * 350, "é" * 160]))
TREES = st.lists(st.tuples(st.integers(0, 1000), st.dictionaries(KEYS, VALUES, max_size=4),
                           st.booleans()), min_size=1, max_size=25)


def _predicates():
    comparison = st.builds(lambda k, op, v: f"{k}{op}{v}", KEYS,
                           st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), VALUES)
    has = st.builds(lambda k: f"has:{k}", st.one_of(KEYS, st.just("obs")))
    return st.lists(st.one_of(comparison, has), max_size=3)


def _build(db, cat, tree) -> dict[str, SnapshotRecord]:
    records: dict[str, SnapshotRecord] = {}
    for n, (pick, labels, obs) in enumerate(tree):
        ids = sorted(records)
        parent = ids[pick % len(ids)] if ids and pick % 4 else None
        labels = {k: v for k, v in labels.items() if v}  # empty values are removals, not labels
        records[f"s{n:03d}"] = _record(parent, labels, obs, n)

    def put(txn):
        for sid, rec in records.items():
            cat.put_snapshot(txn, sid, rec)

    db.write(put)
    return records


@hypothesis_settings(60)
@given(tree=TREES, words=_predicates(), sort=st.one_of(st.none(), KEYS),
       descending=st.booleans(), limit=st.one_of(st.none(), st.integers(0, 30)),
       lineage=st.sampled_from(["none", "parent", "ancestor"]), pick=st.integers(0, 100))
def test_find_answers_as_the_records_say(tmp_path_factory, tree, words, sort, descending, limit,
                                         lineage, pick):
    db = MetaDB(tmp_path_factory.mktemp("meta"))
    try:
        cat = Catalog(db.dbs)
        try:
            preds = [parse_predicate(w) for w in words]
        except InvalidArgumentError:
            return  # a value the labels could never hold (checked by the parse tests)
        records = _build(db, cat, tree)
        target = sorted(records)[pick % len(records)]
        q = FindQuery(tuple(preds), sort, descending and sort is not None, limit,
                      target if lineage == "parent" else None,
                      target if lineage == "ancestor" else None)
        with db.read() as txn:
            got = find(cat, txn, q)
        assert got == _reference(records, q)
        assert parse_find(q.words()) == q  # the ctl words give the query back
    finally:
        db.close()


@hypothesis_settings(40)
@given(tree=TREES, relabel=st.lists(st.tuples(st.integers(0, 100),
                                              st.dictionaries(KEYS, VALUES, max_size=3)),
                                    max_size=8),
       prune=st.lists(st.integers(0, 100), max_size=5))
def test_indexes_follow_every_change_of_the_records(tmp_path_factory, tree, relabel, prune):
    """Labels rewritten and snapshots deleted: the indexes say what the records say, and a
    rebuild from the records (the format upgrade) writes the same indexes."""
    db = MetaDB(tmp_path_factory.mktemp("meta"))
    try:
        cat = Catalog(db.dbs)
        records = _build(db, cat, tree)

        def change(txn):
            for pick, labels in relabel:
                sid = sorted(records)[pick % len(records)]
                records[sid] = _record(records[sid].parent, {k: v for k, v in labels.items() if v})
                cat.put_snapshot(txn, sid, records[sid])
            for pick in prune:
                if records:
                    sid = sorted(records)[pick % len(records)]
                    cat.delete_snapshot(txn, sid, records[sid])
                    del records[sid]

        db.write(change)

        def indexes():
            with db.read() as txn:
                kids = {p: cat.children(txn, p) for p in [None, *records, *"xyz"]}
                labels = {k: list(cat.labelled(txn, k)) for k in
                          ["reward", "visits", "action", "a.b", "_x"]}
                return kids, labels

        kids, labels = indexes()
        for p, got in kids.items():
            assert got == sorted(s for s, r in records.items() if r.parent == p)
        for k, got in labels.items():
            assert got == sorted((s, r.labels[k]) for s, r in records.items() if k in r.labels)
        db.write(cat.rebuild_indexes)
        assert indexes() == (kids, labels)
    finally:
        db.close()


def test_find_names_a_missing_parent_or_ancestor(catalog):
    db, cat = catalog
    _build(db, cat, [(0, {"reward": "1"}, False)])
    with db.read() as txn:
        for q in (FindQuery(parent="nope"), FindQuery(ancestor="nope")):
            with pytest.raises(NotFoundError, match="nope"):
                find(cat, txn, q)


def test_a_pruned_parents_children_are_roots_and_still_its_children(catalog):
    """A snapshot keeps the parent it was committed on after that parent is pruned: it is a
    root of the tree (as `cascowfs tree` shows it) and still that id's child, which
    `children` and `find --parent` / `--ancestor` answer instead of ENOENT."""
    db, cat = catalog
    records = {"a": _record(None, {}), "b": _record("a", {}), "c": _record("b", {"r": "1"}),
               "d": _record("c", {})}
    db.write(lambda txn: [cat.put_snapshot(txn, sid, rec) for sid, rec in records.items()])
    db.write(lambda txn: cat.delete_snapshot(txn, "b", records["b"]))
    with db.read() as txn:
        assert cat.orphans(txn) == ["c"]
        assert cat.children(txn, None) == ["a"]
        assert cat.children_or_orphans(txn, "b") == ["c"]
        assert find(cat, txn, FindQuery(parent="b")) == ["c"]
        assert find(cat, txn, FindQuery(ancestor="b")) == ["c", "d"]
        assert find(cat, txn, FindQuery(ancestor="a")) == []
        for q in (FindQuery(parent="zzz"), FindQuery(ancestor="zzz")):
            with pytest.raises(NotFoundError, match="zzz"):
                find(cat, txn, q)


def test_descendants_of_a_deep_lineage_need_no_recursion(catalog):
    db, cat = catalog

    def put(txn):
        parent = None
        for n in range(5000):
            cat.put_snapshot(txn, f"d{n:05d}", _record(parent, {}))
            parent = f"d{n:05d}"

    db.write(put)
    with db.read() as txn:
        assert len(descendants(cat, txn, "d00000")) == 4999
        assert find(cat, txn, FindQuery(ancestor="d04990")) == [f"d{n:05d}" for n in
                                                                 range(4991, 5000)]


def test_numbers_compare_as_numbers_and_the_rest_as_text(catalog):
    db, cat = catalog
    values = {"a": "9", "b": "10", "c": "1e1", "d": "abc", "e": "-0.5", "f": "10.0"}

    def put(txn):
        for sid, v in values.items():
            cat.put_snapshot(txn, sid, _record(None, {"r": v}))

    db.write(put)
    with db.read() as txn:
        def ids(*words):
            return find(cat, txn, parse_find(list(words)))

        # 10 > 9 as numbers, though "10" < "9" as text; "abc" > "9" as text
        assert ids("r>9") == ["b", "c", "d", "f"]
        assert ids("r=10") == ["b", "c", "f"]
        assert ids("r>a") == ["d"]  # "abc" > "a"; a number against a word compares text
        assert ids("r<0") == ["e"]
        assert ids("--sort", "-r") == ["b", "c", "f", "a", "e", "d"]
        assert ids("--sort", "r", "--limit", "2") == ["e", "a"]
        assert ids("has:r", "r!=10", "--sort", "r") == ["e", "a", "d"]
        assert ids("r>0", "r<10") == ["a"]  # one range of the ordered index, both bounds
        assert ids("r>=-0.5", "r<=9", "--sort", "-r") == ["a", "e"]
        assert ids("--sort", "-r", "--limit", "4") == ["b", "c", "f", "a"]  # ties by id
        assert ids("--sort", "r", "--limit", "6") == ["e", "a", "b", "c", "f", "d"]
        assert ids("r>=a", "--sort", "r", "--limit", "9") == ["d"]


def test_values_longer_than_an_order_key_sort_and_compare_whole(catalog):
    """LMDB keys hold at most 511 bytes, so the ordered index keeps only the first
    ORDER_KEPT sort bytes of a long value: values cut at the same bytes, and bounds as long,
    must still sort and compare as the whole values do (the reference reading)."""
    db, cat = catalog
    q, one = "q" * 299, "1" + "0" * 400  # ORDER_KEPT sort bytes are the tag and 299 chars
    values = [q + "ab", q + "b", q + "a", "q" * 420, q, "q" * 298 + "r", "p" * 500, "5",
              one, one + "x", "1" + "0" * 399 + "x", "1" + "0" * 350 + "-", one[:300] + "é",
              "é" * 4096, "é" * 4095 + "f"]
    records = {f"s{n:02d}": _record(None, {"note": v, "k": "x" * 4096}) for n, v in
               enumerate(values)}
    long_id = "i" * 128
    records[long_id] = _record(None, {"n" * 64: "y" * 4096, "note": q + "a"})

    def put(txn):
        for sid, rec in records.items():
            cat.put_snapshot(txn, sid, rec)

    db.write(put)
    with db.read() as txn:
        for bound in (one, "9" * 350, "5", q):
            for op in ("=", "!=", "<", "<=", ">", ">="):
                for sort in (None, "note"):
                    for descending in (False, True):
                        for limit in (None, 1, 3, 9, 20):
                            query = FindQuery((parse_predicate(f"note{op}{bound}"),), sort,
                                              descending and sort is not None, limit)
                            assert find(cat, txn, query) == _reference(records, query), query
        for descending in (False, True):
            for limit in range(len(records) + 1):
                query = FindQuery((), "note", descending, limit)
                assert find(cat, txn, query) == _reference(records, query), query
        # the index read directly, between any two bounds, long ones too, either way
        whole = {(sort_bytes(rec.labels["note"]), sid) for sid, rec in records.items()}
        bounds = sorted({sort for sort, _ in whole} | {sort[:300] for sort, _ in whole}
                        | {sort + b"\1" for sort, _ in whole} | {b"", TEXT_TAG, AFTER_TEXT})
        for low in bounds:
            for high in bounds:
                for descending in (False, True):
                    want = sorted((w for w in whole if low <= w[0] < high), reverse=descending)
                    assert list(cat.ordered(txn, "note", low, high, descending=descending)) == want
    db.write(lambda txn: cat.delete_snapshot(txn, long_id, records.pop(long_id)))
    with db.read() as txn:
        assert cat.index_mismatches(txn) == []
        assert find(cat, txn, FindQuery((parse_predicate("note>" + q),), "note", True, 3)) == [
            "s13", "s14", "s05"]


@pytest.mark.parametrize("words", [
    ["reward"], ["=1"], ["has:"], ["has:a b"], ["has:obs=1"], ["re ward>1"], ["reward>\x01"],
    ["reward=" + "v" * 4097], ["--sort"], ["--sort", "-"], ["--sort", "a;b"], ["--sort", "obs"],
    ["--limit", "-1"], ["--limit", "1.5"], ["--limit", "١"], ["--limit", str(1 << 40)],
    ["--parent", "../x"], ["--parent", "a", "--ancestor", "b"], ["--ancestor", ""],
    ["--limit", "1", "--limit", "2"], ["--bogus"], ["obs=1"], ["obs>1"], ["ключ=1"],
])
def test_hostile_find_words_are_invalid(words):
    with pytest.raises(InvalidArgumentError):
        parse_find(words)


@hypothesis_settings(300)
@given(st.lists(st.text(max_size=30), max_size=6))
def test_any_find_words_parse_or_are_einval(words):
    try:
        q = parse_find(words)
    except InvalidArgumentError:
        return
    assert parse_find(q.words()) == q


def test_nan_and_inf_are_words_not_numbers():
    assert not any(NUMBER_RE.fullmatch(t) for t in ("nan", "inf", "-inf", "1_0", "0x1", " 1"))
    assert all(math.isfinite(float(t)) for t in ("1e3", "+.5", "-0", "7."))


def test_obs_is_no_label_key():
    for bad in ({"obs": "x"}, {"obs": ""}):
        with pytest.raises(InvalidArgumentError, match="reserved"):
            check_labels(bad)
    with pytest.raises(InvalidArgumentError, match="reserved"):
        parse_labels(["obs=@/etc/passwd"])


def test_more_predicates_than_the_cap_are_invalid_wherever_they_come_from():
    """Any caller may send find: a 64 KiB command held 6,500 predicates, each a pass over the
    candidates. Beyond MAX_PREDICATES the query is EINVAL naming the cap, through ctl and
    through the matcher of a remote's listing alike."""
    at_cap = ["has:reward"] + [f"visits!={n}" for n in range(MAX_PREDICATES - 1)]
    assert len(parse_find([*at_cap, "--sort", "reward", "--limit", "1"]).predicates) == 64
    for words in ([*at_cap, "visits!=x"], ["visits!=2"] * 6500):
        with pytest.raises(InvalidArgumentError, match=f"at most {MAX_PREDICATES}"):
            parse_find(words)
        with pytest.raises(InvalidArgumentError, match=f"at most {MAX_PREDICATES}"):
            parse_command(("find " + " ".join(words)).encode())
        with pytest.raises(InvalidArgumentError, match=f"at most {MAX_PREDICATES}"):
            label_matcher(words)
    assert label_matcher(at_cap)({"reward": "1", "visits": "-1"}, False)


@pytest.mark.parametrize("sort", [[], ["--sort", "-reward", "--limit", "5"]])
def test_a_query_tests_each_candidates_value_once_a_key(catalog, monkeypatch, sort):
    """The cost of find is candidates x distinct keys, not x predicates: a predicate given
    again, or another one on the same key, reads and parses no value again."""
    db, cat = catalog
    n = 300
    db.write(lambda txn: [cat.put_snapshot(txn, f"s{i:03d}", _record(
        None, {"reward": str(i), "visits": str(i)})) for i in range(n)])
    parsed = []
    real = episodes.label_number
    monkeypatch.setattr(episodes, "label_number", lambda text: parsed.append(text) or real(text))
    words = ["has:reward"] + ["visits!=2"] * 40 + [f"visits<{k}" for k in range(100, 123)]
    with db.read() as txn:
        got = find(cat, txn, parse_find(words + sort))
    assert got == ([f"s{i:03d}" for i in range(100) if i != 2] if not sort else
                   [f"s{i:03d}" for i in range(99, 94, -1)])
    assert len(parsed) <= 2 * n + len(words)  # values once (+ the sort key's), bounds once
