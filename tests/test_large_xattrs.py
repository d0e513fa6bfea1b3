"""xattrs up to the kernel's 64 KiB: kept when the store's filesystem holds them (tmpfs here,
like xfs), refused with E2BIG naming the file and the xattr when it does not (plain ext4), on
import and on commit."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from cascowfs.errors import XattrTooLargeError
from conftest import check_live, loop_ext4, loop_unavailable, open_store

pytestmark = [pytest.mark.engine, pytest.mark.loop]  # tmpfs and loop ext4 mounts, stores

BIG = 65536  # XATTR_SIZE_MAX: valid on xfs, tmpfs, ext4 with ea_inode


def _tmpfs(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(path)], check=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def big_xattr_source(tmp_path: Path):
    """A tmpfs tree whose file carries a 64 KiB user xattr (ext4 without ea_inode refuses it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs needs root")
    src = tmp_path / "src"
    _tmpfs(src)
    try:
        (src / "model.bin").write_bytes(b"weights")
        os.setxattr(src / "model.bin", "user.checksum", b"c" * BIG)
        yield src
    finally:
        _umount(src)


def test_a_store_on_plain_ext4_refuses_a_large_xattr_naming_file_and_xattr(big_xattr_source,
                                                                            tmp_path: Path):
    if loop_unavailable():
        pytest.skip(loop_unavailable())
    # ext4 without ea_inode keeps about 4 KiB of xattrs per file
    with loop_ext4(tmp_path / "ext4", 128) as disk, open_store(disk / "store") as sm:
        with pytest.raises(XattrTooLargeError) as exc:
            sm.import_tree(big_xattr_source, "big")
        assert exc.value.errno == errno.E2BIG
        assert "model.bin" in exc.value.message and "user.checksum" in exc.value.message
        assert "big" not in [s.id for s in sm.snapshots()]
        # a commit cannot meet one: the branch's own upper layer, on the same disk, refuses it
        branch = sm.create_branch("agent")
        (branch.tree / "f").write_text("x\n")
        with pytest.raises(OSError) as refused:
            os.setxattr(branch.tree / "f", "user.big", b"b" * BIG)
        assert refused.value.errno in (errno.ENOSPC, errno.E2BIG)
        sm.commit("agent", "step")
        assert sm.read_tree(sm.root_entry("step").ref)[b"f"].xattrs == ()
        check_live(sm, deep=True)  # the refused import left nothing behind


def test_a_store_that_holds_large_xattrs_keeps_them_on_import_and_commit(big_xattr_source,
                                                                         tmp_path: Path):
    disk = tmp_path / "tmpfs-store"
    _tmpfs(disk)
    try:
        with open_store(disk / "store") as sm:
            sm.import_tree(big_xattr_source, "big")
            entry = sm.read_tree(sm.root_entry("big").ref)[b"model.bin"]
            assert dict(entry.xattrs)[b"user.checksum"] == b"c" * BIG
            branch = sm.create_branch("agent", "big")
            assert os.getxattr(branch.tree / "model.bin", "user.checksum") == b"c" * BIG
            (branch.tree / "new").write_text("n\n")
            os.setxattr(branch.tree / "new", "user.big", b"n" * BIG)
            sm.commit("agent", "step")
            entry = sm.read_tree(sm.root_entry("step").ref)[b"new"]
            assert dict(entry.xattrs)[b"user.big"] == b"n" * BIG
            again = sm.create_branch("again", "step")  # its layers hold the value too
            assert os.getxattr(again.tree / "new", "user.big") == b"n" * BIG
    finally:
        _umount(disk)
