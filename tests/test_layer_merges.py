"""Background merges of delta layers keep a lineage's chain shallow (``StateManager.merge_layers``).

Commits of one lineage must end up on a chain shaped like a counter in base ``MERGE_FAN_IN``,
whether the merges keep up with the commits or lag far behind them; every snapshot must still
read back exactly as it was committed, and fsck must find the store whole.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import conftest
from conftest import assert_same_view, check_live, dir_view, needs_overlay, snapshot_view
from cascowfs.catalog import LayerRecord
from cascowfs.layer_builder import LayerBuilder
from cascowfs.merge_plan import counter_spans
from cascowfs.tuning import Tuning
from cascowfs.errors import BusyError

pytestmark = needs_overlay


def _spans(sm, id: str) -> list[int]:
    with sm.db.read() as txn:
        chain = sm.catalog.snapshot(txn, id).layers
        return [sm.catalog.layer(txn, lid).span for lid in chain]


def _lineage(sm, src: Path, commits: int, *, settle_each: bool) -> dict[str, dict]:
    sm.import_tree(src, "base")
    tree = sm.create_branch("b", "base").tree
    views = {}
    for i in range(1, commits + 1):
        (tree / f"f{i % 7}").write_text(f"version {i}")
        sid = sm.commit("b", f"g{i}")
        views[sid] = dir_view(tree)
        if settle_each:
            sm.settle()
    return views


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(10):
        (src / "d" / f"x{i}").write_text(str(i))
    return src


def test_a_lineage_settled_after_each_commit_has_the_counters_shape(tmp_path):
    commits = 2 * Tuning().merge_fan_in ** 2 + Tuning().merge_fan_in + 3
    with conftest.open_store(tmp_path / "store") as sm:
        views = _lineage(sm, _source(tmp_path), commits, settle_each=True)
        assert _spans(sm, f"g{commits}") == counter_spans(commits, Tuning().merge_fan_in) + [0]
        for sid, view in views.items():
            assert_same_view(snapshot_view(sm, sid), view, sid)
        check_live(sm, deep=True)
        sm.discard("b")


def test_merges_that_lag_behind_the_commits_still_keep_the_chain_shallow(tmp_path, monkeypatch):
    """Every merge waits until all commits are made, so each commit takes its parent's chain
    unmerged. The merges must still bring the tip's chain to the counter's shape (before,
    the tip's chain grew by a layer per commit: at 500 no branch can mount it)."""
    commits = 40
    with conftest.open_store(tmp_path / "store") as sm:
        gate = threading.Event()
        merge_now = sm.merge_layers

        def merge_later(id: str) -> None:
            gate.wait()
            merge_now(id)

        monkeypatch.setattr(sm, "merge_layers", merge_later)
        try:
            views = _lineage(sm, _source(tmp_path), commits, settle_each=False)
            assert len(_spans(sm, f"g{commits}")) == commits + 1  # no merge has run yet
        finally:
            gate.set()  # else the background worker, and closing the store, would wait forever
        sm.settle()
        assert _spans(sm, f"g{commits}") == counter_spans(commits, Tuning().merge_fan_in) + [0]
        for sid, view in views.items():
            assert_same_view(snapshot_view(sm, sid), view, sid)
        check_live(sm, deep=True)
        tree = sm.create_branch("tip", f"g{commits}").tree
        assert dir_view(tree) == views[f"g{commits}"]
        sm.discard("tip")
        sm.discard("b")


def test_a_chain_grown_too_deep_is_merged_whole_at_its_next_merge(tmp_path, monkeypatch):
    """Chains that an older version let grow (each commit on its parent's unmerged chain) are
    repaired: past ``MERGE_ALL_ABOVE`` layers, a merge folds every delta into one."""
    with conftest.open_store(tmp_path / "store", tuning=Tuning(merge_all_above=12)) as sm:
        monkeypatch.setattr(sm, "merge_layers", lambda id: None)  # as if merges fell behind
        views = _lineage(sm, _source(tmp_path), 20, settle_each=False)
        sm.settle()
        assert len(_spans(sm, "g20")) == 21
        monkeypatch.undo()
        sm.merge_layers("g20")
        assert _spans(sm, "g20") == [20, 0]
        for sid, view in views.items():
            assert_same_view(snapshot_view(sm, sid), view, sid)
        check_live(sm, deep=True)
        tree = sm.create_branch("tip", "g20").tree
        assert dir_view(tree) == views["g20"]
        sm.discard("tip")
        sm.discard("b")


def test_a_chain_swap_naming_a_layer_gone_meanwhile_changes_nothing(tmp_path):
    """A merge reads its parent's chain before its transaction; if the parent's own rewrite
    dropped one of those layers meanwhile, the swap must refuse (EBUSY) and leave the
    snapshot's chain and every layer count as they were."""
    with conftest.open_store(tmp_path / "store") as sm:
        _lineage(sm, _source(tmp_path), 2, settle_each=True)
        with sm.db.read() as txn:
            chain = sm.catalog.snapshot(txn, "g2").layers
            counts = {bytes(k): bytes(v) for k, v in txn.cursor(db=sm.db.db("layers"))}
        with pytest.raises(BusyError, match="changed meanwhile"):
            sm._replace_chain("g2", chain, chain[:1] + ["0123456789"] + chain[1:])
        with sm.db.read() as txn:
            assert sm.catalog.snapshot(txn, "g2").layers == chain
            assert {bytes(k): bytes(v) for k, v in txn.cursor(db=sm.db.db("layers"))} == counts
        check_live(sm, deep=True)
        sm.discard("b")


# ----------------------------------------------------------------------------------------
# a commit's delta layer is written after the commit
# ----------------------------------------------------------------------------------------
def _layer_of(sm, sid: str) -> tuple[str, LayerRecord]:
    with sm.db.read() as txn:
        lid = sm.catalog.snapshot(txn, sid).layers[0]
        return lid, sm.catalog.layer(txn, lid)


def _no_background_builds(monkeypatch) -> None:
    """Stores opened from now on never write a commit's layer in the background: only a
    mount that needs it does."""
    monkeypatch.setattr(LayerBuilder, "_build_loop", lambda self: None)


def test_a_branch_on_a_commit_not_written_yet_writes_its_layer_first(tmp_path, monkeypatch):
    _no_background_builds(monkeypatch)
    with conftest.open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "base")
        tree = sm.create_branch("b", "base").tree
        (tree / "d" / "x3").write_text("changed")
        (tree / "d" / "x4").unlink()
        (tree / "new").write_text("new")
        sm.commit("b", "s1")
        view = dir_view(tree)
        lid, rec = _layer_of(sm, "s1")
        assert rec.built is False and rec.seq == 0
        assert not (sm.layers_dir / lid).exists(), "the commit wrote its layer itself"
        check_live(sm, deep=True)  # a layer not written yet is no fault

        other = sm.create_branch("c", "s1").tree
        assert dir_view(other) == view
        lid, rec = _layer_of(sm, "s1")
        assert rec.seq > 0 and rec.built and rec.below is None
        assert sm.layers.exists(lid)
        assert_same_view(snapshot_view(sm, "s1"), view, "s1")
        check_live(sm, deep=True)
        sm.discard("c")
        sm.discard("b")


def test_a_layer_dropped_before_it_was_written_never_is(tmp_path, monkeypatch):
    _no_background_builds(monkeypatch)
    with conftest.open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "base")
        tree = sm.create_branch("b", "base").tree
        (tree / "new").write_text("new")
        sm.commit("b", "s1")
        lid, _ = _layer_of(sm, "s1")
        sm.discard("b")
        sm.prune("s1")
        sm.layers.build(lid)  # what the background thread would do next
        assert not sm.layers.is_unbuilt(lid)
        assert not (sm.layers_dir / lid).exists()
        check_live(sm, deep=True)


def test_layers_not_written_before_a_close_are_written_after_the_next_open(tmp_path, monkeypatch):
    store = tmp_path / "store"
    with monkeypatch.context() as patch:
        _no_background_builds(patch)
        with conftest.open_store(store) as sm:
            sm.import_tree(_source(tmp_path), "base")
            tree = sm.create_branch("b", "base").tree
            (tree / "d" / "x1").write_text("one")
            sm.commit("b", "s1")
            (tree / "d" / "x2").write_text("two")
            sm.commit("b", "s2")
            view = dir_view(tree)
            lids = [_layer_of(sm, sid)[0] for sid in ("s1", "s2")]
            # a layer placed by a process killed before recording it: maybe torn
            (sm.layers_dir / lids[1]).mkdir()
    with conftest.open_store(store) as sm:
        sm.settle()
        for sid in ("s1", "s2"):
            lid, rec = _layer_of(sm, sid)
            assert rec.built and sm.layers.exists(lid), sid
        assert dir_view(sm.create_branch("c", "s2").tree) == view
        check_live(sm, deep=True)
        sm.discard("c")
        sm.discard("b")
