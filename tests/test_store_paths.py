"""A store works wherever it lives: its path may hold what any path may (a backslash, a space,
a comma, a colon, non-ASCII letters), and branches still mount, show their snapshot and commit.
overlayfs unescapes backslashes in its upperdir and workdir options, even through fsconfig."""

from __future__ import annotations

import pytest

from conftest import force_unmount_below, mounts_below, needs_overlay, open_store
from cascowfs.state import StateManager

pytestmark = needs_overlay


@pytest.mark.parametrize("name", ["st\\ore", "st ore", "st,ore", "st:ore", "störe", "a\\\\b"])
def test_branches_mount_and_commit_in_a_store_of_any_path(tmp_path, name):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("one\n")
    with open_store(tmp_path / name / "store") as sm:
        sm.import_tree(src, "base")
        tree = sm.create_branch("b", "base").tree
        assert (tree / "f").read_text() == "one\n"
        (tree / "g").write_text("two\n")
        sm.commit("b", "c1")
        assert [(c.kind, c.path) for c in sm.diff("base", "c1")] == [("A", "g")]


def test_a_store_named_through_a_symlink_or_dotdot_is_one_store(tmp_path):
    """Mounts are found by their paths in the mount table: a store opened as a symlink or
    with ``..`` in its path used to miss its own branches' mounts and mount each again, on
    the same upper and work directories."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("one\n")
    store = tmp_path / "real" / "store"
    (tmp_path / "link").symlink_to(tmp_path / "real")
    named = [tmp_path / "link" / "store", tmp_path / "src" / ".." / "real" / "store"]
    try:
        sm = StateManager.open(store)
        try:
            sm.import_tree(src, "base")
            sm.create_branch("b", "base")
        finally:
            sm.close()  # as a daemon's unmount: the branch stays mounted
        before = len(mounts_below(store))
        for path in named:
            sm = StateManager.open(path)
            try:
                assert sm.store == store and (sm.branch("b").tree / "f").read_text() == "one\n"
            finally:
                sm.close()
            assert len(mounts_below(store)) == before, path
        with open_store(named[0]) as sm:  # closed with its branches unmounted: none left
            assert [b.name for b in sm.branches()] == ["b"]
    finally:
        force_unmount_below(store)
