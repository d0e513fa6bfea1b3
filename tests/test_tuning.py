"""``Tuning``: a store runs by the figures it was opened with, and the defaults are the
daemon's."""

from __future__ import annotations

import dataclasses

import pytest

import conftest
from conftest import check_live, needs_overlay
from cascowfs import durability
from cascowfs.tuning import Tuning


def test_the_defaults_are_the_daemons_figures():
    t = Tuning()
    assert (t.checkpoint_every, t.collect_after_seconds, t.sweep_slice, t.merge_fan_in,
            t.merge_all_above, t.flatten_tries) == (1024, 5.0, 300, 8, 64, 5)
    assert t.layer_sync_seconds == durability.LAYER_SYNC_SECONDS


def test_a_tuning_cannot_change_under_an_open_store():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Tuning().sweep_slice = 1  # type: ignore[misc]


@needs_overlay
@pytest.mark.parametrize("fan_in", [2, 3])
def test_a_store_merges_its_layers_with_the_fan_in_it_was_opened_with(tmp_path, fan_in):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    with conftest.open_store(tmp_path / "store", tuning=Tuning(merge_fan_in=fan_in)) as sm:
        assert sm.tuning.merge_fan_in == fan_in
        sm.import_tree(src, "base")
        tree = sm.create_branch("b", "base").tree
        for i in range(1, fan_in ** 2 + 1):
            (tree / "a").write_text(f"version {i}")
            sm.commit("b", f"g{i}")
            sm.settle()
        with sm.db.read() as txn:
            chain = sm.catalog.snapshot(txn, f"g{fan_in ** 2}").layers
            spans = [sm.catalog.layer(txn, lid).span for lid in chain]
        assert spans == [fan_in ** 2, 0]  # one counter digit: fan_in squared commits
        check_live(sm, deep=True)
        sm.discard("b")
