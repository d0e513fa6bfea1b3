"""A store works wherever it lives: its path may hold what any path may (a backslash, a space,
a comma, a colon, non-ASCII letters), and branches still mount, show their snapshot and commit.
overlayfs unescapes backslashes in its upperdir and workdir options, even through fsconfig."""

from __future__ import annotations

import pytest

from conftest import needs_overlay, open_store

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
