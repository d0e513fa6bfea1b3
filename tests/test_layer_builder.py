"""Layer directories (``layer_builder.py``): rebuilding them from the CAS, and which of them
may not have reached the disk yet."""

from __future__ import annotations

import conftest
from conftest import check_live, dir_view, needs_overlay
from cascowfs.layers import remove_within_filesystem

pytestmark = needs_overlay


def _source(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"f{i}").write_text(f"file {i}\n" * (i + 1))
    (src / "link").symlink_to("d/f1")
    return src


def _layer_view(path) -> dict:
    """A layer's view, whiteouts without their mtime (a whiteout is made anew each time)."""
    return {p: node._replace(mtime_ns=0) if node.kind == "c" and node.rdev == 0 else node
            for p, node in dir_view(path).items()}


def _shown(sm, lid: str) -> dict:
    """What layer ``lid`` shows, its image mounted if it is one."""
    with sm.layers.mounted([lid]) as (shown,):
        return _layer_view(shown)


def _chain(sm, sid: str) -> list[str]:
    with sm.db.read() as txn:
        return sm.catalog.snapshot(txn, sid).layers


def test_an_empty_chain_stacks_the_empty_layer(tmp_path):
    with conftest.open_store(tmp_path / "store") as sm:
        assert sm.layers.lower_paths([]) == [sm.empty_dir]
        assert sm.layers.lower_paths(["a", "b"]) == [sm.layers_dir / "a", sm.layers_dir / "b"]


def test_layers_rebuilt_from_the_cas_show_what_they_showed(tmp_path):
    with conftest.open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "base")
        tree = sm.create_branch("b", "base").tree
        (tree / "d" / "f2").write_text("changed")
        (tree / "d" / "f3").unlink()
        sm.commit("b", "c1")
        sm.settle()
        chain = _chain(sm, "c1")
        views = {lid: _shown(sm, lid) for lid in chain}
        for lid in chain:
            remove_within_filesystem(sm.layers.path(lid))
        unmounted: list[str] = []

        def unmount(name: str) -> None:
            unmounted.append(name)
            sm.unmount_branch(name)

        sm.layers.rebuild(set(chain), "for a test", False, unmount)
        assert unmounted == ["b"]  # the branch stacks the base's layer
        assert {lid: _shown(sm, lid) for lid in chain} == views
        with sm.db.read() as txn:
            rec = sm.catalog.branch(txn, "b")
        sm.mount_branch("b", rec, fresh_upper=False)
        check_live(sm, deep=True)  # every chain shows its snapshot's tree again
        sm.discard("b")


def test_layers_are_unsynced_until_a_sync_covers_them(tmp_path):
    with conftest.open_store(tmp_path / "store") as sm:
        sm.import_tree(_source(tmp_path), "base")
        (lid,) = _chain(sm, "base")
        assert lid in sm.layers.unsynced()
        sm.layers.sync()
        assert sm.layers.unsynced() == set()
