"""cascowfs/durability.py: syncfs(2) on a store's file system, and the id of the page cache
that holds its unsynced writes (which changes with every boot and every mount)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from conftest import needs_overlay
from cascowfs import durability, overlay


def test_boot_id_is_the_kernels():
    with open(durability.BOOT_ID_PATH) as fh:
        assert durability.boot_id() == fh.read().strip() != ""


def test_without_a_boot_id_no_reboot_is_seen(tmp_path, monkeypatch):
    monkeypatch.setattr(durability, "BOOT_ID_PATH", str(tmp_path / "missing"))
    assert durability.boot_id() == ""
    assert durability.page_cache_id(tmp_path).startswith("/mount ")


def test_one_mount_one_page_cache_id(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "f").write_bytes(b"x")
    ids = {durability.page_cache_id(p) for p in (tmp_path, tmp_path / "a" / "deep",
                                                  tmp_path / "f")}
    assert len(ids) == 1
    (only,) = ids
    assert only.startswith(durability.boot_id() + "/mount "), only
    assert durability.page_cache_id(Path("/proc")) != only, "another mount, the same id"


@needs_overlay  # root, to mount
def test_a_new_mount_of_the_same_directories_has_a_new_id(tmp_path):
    lowers = [tmp_path / "top", tmp_path / "bottom"]  # read-only: two lowers, no upper
    for layer in lowers:
        layer.mkdir()
    (lowers[1] / "f").write_bytes(b"x")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    seen = set()
    for _ in range(2):
        overlay.mount_overlay(mnt, lowers)
        try:
            seen.add(durability.page_cache_id(mnt / "f"))
        finally:
            overlay.unmount(mnt, lazy=False)
    assert len(seen) == 2, f"a remount kept its page cache id: {seen}"


def test_syncfs_takes_any_directory_and_names_a_bad_path(tmp_path):
    durability.syncfs(tmp_path)
    with pytest.raises(FileNotFoundError):
        durability.syncfs(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OSError) as info:
        durability.syncfs(tmp_path / "file")
    assert info.value.errno == errno.ENOTDIR and "file" in str(info.value)
