"""The episode store in the engine: labels after commit, reset, large observations, the
indexes that commits, prunes and the format upgrade keep, and the episode records."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, strategies as st

from cascowfs.catalog import STORE_FORMAT
from cascowfs.episodes import FindQuery, Predicate
from cascowfs.errors import BusyError, InvalidArgumentError, NotFoundError
from cascowfs.fsck import check
from cascowfs.names import MAX_LABEL_VALUE_CHARS, MAX_LABELS
from conftest import dir_view, hypothesis_settings, open_store, snapshot_view

pytestmark = pytest.mark.engine


@pytest.fixture
def tree(sm, tmp_path):
    """Snapshot ``root`` (imported), ``a`` and ``b`` committed on it by branch ``work``."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("root\n")
    sm.import_tree(src, "root", {"reward": "0"})
    work = sm.create_branch("work", "root").tree
    (work / "f").write_text("a\n")
    sm.commit("work", "a", {"reward": "0.7", "action": "edit"})
    (work / "g").write_text("b\n")
    sm.commit("work", "b", {"reward": "0.2", "action": "add"})
    return sm


# ----------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------
def test_label_sets_replaces_and_removes_and_leaves_the_tree(tree):
    view, root = snapshot_view(tree, "a"), tree.snapshot("a").root
    assert tree.label("a", {"visits": "3", "reward": "0.9", "action": ""}) == {
        "reward": "0.9", "visits": "3"}
    info = tree.snapshot("a")
    assert info.labels == {"reward": "0.9", "visits": "3"}
    assert info.root == root and snapshot_view(tree, "a") == view
    assert tree.find(FindQuery(sort="reward", descending=True)) == ["a", "b", "root"]
    tree.label("a", {"gone": ""})  # removing a label it does not have is no error
    assert tree.snapshot("a").labels == {"reward": "0.9", "visits": "3"}


def test_labels_survive_a_reopen(tree):
    tree.label("b", {"visits": "12"})
    store = tree.store
    tree.close()
    with open_store(store) as sm:
        assert sm.snapshot("b").labels == {"reward": "0.2", "action": "add", "visits": "12"}
        assert sm.find(FindQuery(parent="a")) == ["b"]


@pytest.mark.parametrize("changes", [
    {}, {"": "x"}, {"a b": "1"}, {"k": "line\nbreak"}, {"k": "\x7f"}, {"obs": "x"},
    {"k" * 65: "1"}, {"k": "v" * (MAX_LABEL_VALUE_CHARS + 1)}, {"k/../x": "1"}, {"-k": "1"},
])
def test_hostile_label_changes_are_invalid_and_change_nothing(tree, changes):
    before = tree.snapshot("a").labels
    pending = len(tree.wal.pending())
    with pytest.raises(InvalidArgumentError):
        tree.label("a", changes)
    assert tree.snapshot("a").labels == before
    assert len(tree.wal.pending()) == pending


@pytest.mark.parametrize("ident", ["", "../a", "a/b", "nope", "x" * 129, "-a"])
def test_labelling_no_such_snapshot_fails_before_logging(tree, ident):
    pending = len(tree.wal.pending())
    with pytest.raises((NotFoundError, InvalidArgumentError)):
        tree.label(ident, {"k": "v"})
    assert len(tree.wal.pending()) == pending


def test_the_label_caps_hold_for_the_labels_that_result(tree):
    many = {f"k{i}": "v" for i in range(MAX_LABELS - 2)}  # 'a' has two already
    tree.label("a", many)
    with pytest.raises(InvalidArgumentError, match="too many labels"):
        tree.label("a", {"one-more": "v"})
    tree.label("a", {"k0": "", "one-more": "v"})  # a removal makes room in the same call
    assert len(tree.snapshot("a").labels) == MAX_LABELS
    big = {f"b{i}": "x" * 4000 for i in range(9)}
    with pytest.raises(InvalidArgumentError, match="too large"):
        tree.label("b", big)
    assert tree.snapshot("b").labels == {"reward": "0.2", "action": "add"}


@hypothesis_settings(25)
@given(st.lists(st.dictionaries(st.sampled_from(["r", "v", "q", "plan"]),
                                st.sampled_from(["", "1", "0.5", "fix the parser", "ü"]),
                                min_size=1, max_size=3), max_size=6))
def test_labels_are_the_changes_applied_in_order(tree, changes_list):
    model = dict(tree.snapshot("root").labels)
    for changes in changes_list:
        got = tree.label("root", changes)
        for k, v in changes.items():
            if v:
                model[k] = v
            else:
                model.pop(k, None)
        assert got == model
    assert tree.snapshot("root").labels == model
    for key in ("r", "v", "q", "plan"):  # only 'root' ever carries these keys
        assert tree.find(FindQuery(predicates=(_has(key),))) == (["root"] if key in model else [])


def _has(key: str) -> Predicate:
    return Predicate(key)


# ----------------------------------------------------------------------------------------
# queries over the tree commits make
# ----------------------------------------------------------------------------------------
def test_children_and_ancestry_follow_commits_and_prunes(tree):
    assert tree.children(None) == ["root"]
    assert tree.children("root") == ["a"]
    assert tree.children("a") == ["b"]
    other = tree.create_branch("other", "a").tree
    (other / "h").write_text("c\n")
    tree.commit("other", "c", {"reward": "1"})
    assert tree.children("a") == ["b", "c"]
    assert tree.find(FindQuery(ancestor="root")) == ["a", "b", "c"]
    assert tree.find(FindQuery(ancestor="root", sort="reward", descending=True, limit=2)) == [
        "c", "a"]
    tree.discard("other")
    tree.prune("c")
    assert tree.children("a") == ["b"]
    assert tree.find(FindQuery(predicates=(_has("reward"),))) == ["a", "b", "root"]
    with pytest.raises(NotFoundError):
        tree.children("c")


def test_episodes_list_every_snapshot(tree):
    eps = {e.id: e for e in tree.episodes()}
    assert set(eps) == {"root", "a", "b"}
    assert eps["b"].parent == "a" and eps["b"].labels == {"reward": "0.2", "action": "add"}
    assert eps["b"].root == tree.snapshot("b").root and eps["b"].obs is None
    assert eps["b"].files == 2


# ----------------------------------------------------------------------------------------
# reset
# ----------------------------------------------------------------------------------------
def test_reset_drops_changes_and_rebases_where_rebase_refuses(tree):
    work = tree.branch("work").tree
    (work / "junk").write_text("uncommitted\n")
    os.unlink(work / "f")
    with pytest.raises(BusyError):
        tree.rebase("work", "a")
    info = tree.reset("work", "a")
    assert info.parent == "a" and tree.status("work") == []
    assert dir_view(tree.branch("work").tree) == snapshot_view(tree, "a")
    # the branch goes on from there: its next commit is a child of 'a'
    (work / "after").write_text("x\n")
    tree.commit("work", "a2")
    assert tree.children("a") == ["a2", "b"]


def test_reset_of_a_clean_branch_to_another_lineage(tree):
    tree.reset("work", "root")
    assert dir_view(tree.branch("work").tree) == snapshot_view(tree, "root")


@pytest.mark.parametrize("name, ident, error", [
    ("work", "nope", NotFoundError), ("nobranch", "a", NotFoundError),
    ("../work", "a", InvalidArgumentError), ("work", "../a", InvalidArgumentError),
    ("work", "", InvalidArgumentError),
])
def test_a_refused_reset_leaves_the_branch_and_its_changes(tree, name, ident, error):
    work = tree.branch("work").tree
    (work / "keep").write_text("mine\n")
    before = [c.line() for c in tree.status("work")]
    with pytest.raises(error):
        tree.reset(name, ident)
    assert [c.line() for c in tree.status("work")] == before
    assert tree.branch("work").parent == "b"


# ----------------------------------------------------------------------------------------
# large observations
# ----------------------------------------------------------------------------------------
def test_an_observation_lives_with_its_snapshot_and_goes_with_it(tree, tmp_path):
    data = os.urandom(3 << 20) + bytes(1 << 20) + b"tail"  # chunks and a hole
    path = tmp_path / "trace.log"
    path.write_bytes(data)
    os.chmod(path, 0o640)
    work = tree.branch("work").tree
    (work / "x").write_text("x\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        tree.commit("work", "o", {"reward": "1"}, obs=fd)
    finally:
        os.close(fd)
    obs = tree.observation("o")
    assert (obs.size, obs.mode) == (len(data), 0o640)
    assert tree.snapshot("o").obs == len(data)
    assert tree.find(FindQuery(predicates=(_has("obs"),))) == ["o"]
    tree.gc()  # a collection keeps it while the snapshot lives
    assert tree.read_file(bytes.fromhex(obs.ref), 0, len(data)) == data
    with tree.db.read() as txn:
        assert tree.content.find(bytes.fromhex(obs.ref), txn) is not None
    tree.reset("work", "b")  # the branch leaves 'o' so that it may be pruned
    tree.prune("o")
    tree.gc()
    with tree.db.read() as txn:
        assert tree.content.find(bytes.fromhex(obs.ref), txn) is None


def test_an_observation_must_be_a_regular_file(tree, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            with pytest.raises(InvalidArgumentError, match="regular file"):
                tree.commit("work", "bad", obs=fd)
        finally:
            os.close(fd)
    assert not tree.has_snapshot("bad")


# ----------------------------------------------------------------------------------------
# the store format
# ----------------------------------------------------------------------------------------
def test_a_format_7_store_gains_its_indexes_on_open(tree):
    store = tree.store

    def as_format_7(txn):
        txn.drop(tree.db.db("children"), delete=False)
        txn.drop(tree.db.db("labels"), delete=False)
        txn.put(b"format", b"7", db=tree.db.db("meta"))

    tree.db.write(as_format_7)
    tree.close()
    with open_store(store) as sm:
        with sm.db.read() as txn:
            assert sm.catalog.format(txn) == str(STORE_FORMAT).encode()
        assert sm.children("a") == ["b"]
        assert sm.find(FindQuery(predicates=(_has("action"),), sort="reward")) == ["b", "a"]


def test_records_without_an_observation_keep_their_bytes(tree):
    with tree.db.read() as txn:
        raw = json.loads(bytes(txn.get(b"a", db=tree.db.db("snapshots"))))
    assert "obs" not in raw


def test_fsck_checks_the_indexes_and_counts_an_observation_live(tree, tmp_path):
    path = tmp_path / "obs"
    path.write_bytes(os.urandom(200_000))
    fd = os.open(path, os.O_RDONLY)
    try:
        work = tree.branch("work").tree
        (work / "y").write_text("y\n")
        tree.commit("work", "with-obs", obs=fd)
    finally:
        os.close(fd)
    tree.gc()
    with tree.quiesced():
        assert check(tree).problems == []

    def corrupt(txn):
        txn.delete(b"action\0a", db=tree.db.db("labels"))
        txn.put(b"reward\0b", b"99", db=tree.db.db("labels"))
        txn.put(b"nope\0x", b"", db=tree.db.db("children"))

    tree.db.write(corrupt)
    with tree.quiesced():
        problems = check(tree).problems
    assert len(problems) == 3 and all(p.startswith("invariant 2: ") for p in problems), problems
    tree.db.write(tree.catalog.rebuild_indexes)
    with tree.quiesced():
        assert check(tree).problems == []
