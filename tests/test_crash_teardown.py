"""`cascowfs umount MNT --branches` after the daemon was killed (SIGKILL) detaches every branch.

A dead FUSE mount answers nothing (ENOTCONN), so the store it served is read from the mount
table: the FUSE mount's source is the store's path (percent-encoded where libfuse's option
parser would mangle it). Nothing outside the kernel's mount table is needed, so a cleared
/run or a fresh shell does not matter. The store paths tried hold what a path may: spaces,
commas, backslashes, percent signs, non-ASCII (and, for the encoding alone, any bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs.fuse.sysmount import mount_at, store_of_source, store_source
from conftest import hypothesis_settings
from fusehelpers import Cascow, cascow_base, mounts_under, needs_fuse, run_cli

_path_bytes = st.lists(st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b
                                                                  and b"/" not in b),
                       min_size=1, max_size=6)


@hypothesis_settings(300)
@given(_path_bytes)
def test_store_source_names_any_store_path(components):
    store = Path(os.fsdecode(b"/" + b"/".join(components)))
    source = store_source(store)
    assert source.isascii() and source.isprintable()
    assert not set(source) & set(", \t\n\\")  # what libfuse splits at and mountinfo escapes
    assert store_of_source(source) == store


def test_a_source_that_names_no_store():
    assert store_of_source("cascowfs") is None
    assert store_of_source("") is None


@needs_fuse
@pytest.mark.parametrize("store_name", ["store", "st ore,x", "st\\ore%41", "störe"])
def test_umount_branches_after_kill9_leaves_no_mount_of_the_store(store_name):
    with cascow_base() as base:
        fs = Cascow(base)
        fs.store = base / store_name
        try:
            fs.start()
            assert store_of_source(mount_at(fs.mnt).source) == fs.store
            src = base / "src"
            src.mkdir()
            (src / "f").write_text("one\n")
            assert fs.ctl(f"import base {src}")[0] == 0
            for name in ("b1", "b2", "b3"):
                assert fs.ctl(f"branch {name} base")[0] == 0
            tree = Path(os.readlink(fs.mnt / "branches" / "b1" / "tree"))
            (tree / "g").write_text("uncommitted\n")
            fs.kill9()
            left = mounts_under(base)
            # (and the layer images the branches stack, shared: see test_layer_images.py)
            assert sorted(t for _, t in left if t != "erofs") == (
                ["fuse.cascowfs"] + ["overlay"] * 3
            ), left
            proc = run_cli("umount", str(fs.mnt), "--branches", check=False)
            assert proc.returncode == 0, proc.stderr
            assert mounts_under(base) == []
            # the branches are state, not mounts: the next daemon brings them back
            fs.start()
            assert sorted(os.listdir(fs.mnt / "branches")) == ["b1", "b2", "b3"]
            assert (Path(os.readlink(fs.mnt / "branches" / "b1" / "tree")) / "g").read_text() \
                == "uncommitted\n"
        finally:
            fs.teardown()

