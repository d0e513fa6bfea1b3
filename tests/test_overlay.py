"""cascowfs/overlay.py: overlayfs mounts through fsopen/fsconfig(lowerdir+)/fsmount, and the
mount table read back from /proc/self/mountinfo, for hostile paths too."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from conftest import needs_overlay
from cascowfs import overlay
from cascowfs.overlay import MAX_LOWER_LAYERS, MountError


@pytest.mark.parametrize("field,want", [
    ("/plain/path", "/plain/path"),
    (r"/a\040b", "/a b"),
    (r"/tab\011new\012line", "/tab\tnew\nline"),
    (r"/back\134slash", "/back\\slash"),
    (r"/trailing\04", r"/trailing\04"),      # too short to be an escape
    (r"/not\x41octal", r"/not\x41octal"),
    ("", ""),
])
def test_mountinfo_escapes_are_undone(field, want):
    assert overlay.unescape_mountinfo(field) == want


def test_the_mount_table_holds_the_root_once_per_mount_id():
    mounts = overlay.all_mounts()
    assert any(m.target == "/" for m in mounts)
    assert len({m.mount_id for m in mounts}) == len(mounts)
    assert all(m.fstype and m.target.startswith("/") for m in mounts)


def test_mounts_under_takes_a_prefix_of_whole_components():
    proc = overlay.mounts_under(Path("/proc"))
    assert proc and all(m.target == "/proc" or m.target.startswith("/proc/") for m in proc)
    assert not [m for m in overlay.mounts_under(Path("/pro")) if m.target.startswith("/proc")]


def test_an_overlay_needs_a_lower_layer_and_at_most_the_kernels_limit(tmp_path):
    with pytest.raises(ValueError):
        overlay.mount_overlay(tmp_path, [])
    with pytest.raises(MountError, match=str(MAX_LOWER_LAYERS)):
        overlay.mount_overlay(tmp_path, [tmp_path] * (MAX_LOWER_LAYERS + 1))


@needs_overlay  # root: umount2 refuses anyone else before it looks
def test_unmounting_what_is_not_mounted_says_so(tmp_path):
    assert overlay.unmount(tmp_path) is False
    assert overlay.unmount(tmp_path / "missing") is False
    overlay.unmount_stacked(tmp_path)  # nothing stacked: returns at once


def _layers(base: Path, *contents: dict[str, bytes]) -> list[Path]:
    out = []
    for i, files in enumerate(contents):
        layer = base / f"layer{i}"
        layer.mkdir()
        for name, data in files.items():
            (layer / name).write_bytes(data)
        out.append(layer)
    return out


@needs_overlay
@pytest.mark.parametrize("name", ["mnt", "with space", "tab\tand\nnewline", "back\\slash"])
def test_a_writable_overlay_shows_its_layers_top_first_and_writes_to_upper(tmp_path, name):
    lowers = _layers(tmp_path, {"a": b"top"}, {"a": b"bottom", "b": b"only below"})
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / name
    for d in (upper, work, mnt):
        d.mkdir()
    overlay.mount_overlay(mnt, lowers, upper, work)
    try:
        assert (mnt / "a").read_bytes() == b"top" and (mnt / "b").read_bytes() == b"only below"
        (mnt / "b").write_bytes(b"changed")
        assert (upper / "b").read_bytes() == b"changed"
        assert (lowers[1] / "b").read_bytes() == b"only below"
        (record,) = overlay.mounts_under(tmp_path)
        assert (record.target, record.fstype, record.source) == (str(mnt), "overlay", "cascowfs")
        assert any(m == record for m in overlay.all_mounts())
    finally:
        assert overlay.unmount(mnt, lazy=False) is True
    assert overlay.mounts_under(tmp_path) == []


@needs_overlay
def test_a_read_only_overlay_refuses_writes(tmp_path):
    lowers = _layers(tmp_path, {"a": b"1"}, {"b": b"2"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    overlay.mount_overlay(mnt, lowers, readonly=True)
    try:
        assert sorted(os.listdir(mnt)) == ["a", "b"]
        with pytest.raises(OSError) as info:
            (mnt / "c").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
    finally:
        overlay.unmount(mnt, lazy=False)


@needs_overlay
def test_stacked_mounts_and_mounts_under_a_prefix_all_go(tmp_path):
    lowers = _layers(tmp_path, {"a": b"1"}, {"b": b"2"})
    targets = [tmp_path / "x", tmp_path / "y" / "z"]
    for t in targets:
        t.mkdir(parents=True)
    try:
        for _ in range(3):
            overlay.mount_overlay(targets[0], lowers)
        overlay.mount_overlay(targets[1], lowers)
        assert len(overlay.mounts_under(tmp_path)) == 4
        overlay.unmount_stacked(targets[0])
        assert [m.target for m in overlay.mounts_under(tmp_path)] == [str(targets[1])]
        overlay.unmount_under(tmp_path)
        assert overlay.mounts_under(tmp_path) == []
    finally:
        for t in targets:
            while overlay.unmount(t):
                pass


@needs_overlay
def test_a_binding_is_unmounted_by_its_descriptor_where_its_path_no_longer_leads(tmp_path):
    """What a snapshot view binds: one entry of an overlay attached nowhere. Its descriptor
    still reaches the mount once the name it was bound at has moved away."""
    lowers = _layers(tmp_path, {"a": b"1"}, {"b": b"2"})
    mnt_fd = overlay.overlay_mount_fd(tmp_path / "view", lowers, readonly=True)
    place = tmp_path / "place"
    place.mkdir()
    (place / "b").write_bytes(b"")
    dir_fd = os.open(place, os.O_PATH | os.O_DIRECTORY)
    try:
        mount_fd = overlay.clone_into(mnt_fd, b"b", dir_fd, b"b")
        try:
            assert (place / "b").read_bytes() == b"2"
            place.rename(tmp_path / "moved")
            assert not overlay.unmount(place / "b")  # the old path: nothing mounted there
            assert overlay.unmount_by_fd(mount_fd)
            assert overlay.mounts_under(tmp_path) == []
            assert (tmp_path / "moved" / "b").read_bytes() == b""
        finally:
            os.close(mount_fd)
    finally:
        os.close(dir_fd)
        os.close(mnt_fd)
        overlay.unmount_under(tmp_path)


@needs_overlay
def test_a_failed_mount_names_its_target_and_carries_the_errno(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(MountError) as info:
        overlay.mount_overlay(mnt, [tmp_path / "missing", tmp_path / "gone"])
    assert str(mnt) in str(info.value) and info.value.errno == errno.ENOENT
    assert overlay.mounts_under(tmp_path) == []


@needs_overlay
def test_a_branch_grants_no_set_user_id_and_no_device(tmp_path, sm):
    """What another branch committed, root in it maybe, is in this branch's lower layers,
    and any local user may reach a branch's tree: a set-user-id root copy of a program, a
    device node of mode 0666."""
    import shutil
    import subprocess

    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux)")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy("/usr/bin/id", src / "id")
    os.chmod(src / "id", 0o4755)  # root's
    os.mknod(src / "null", 0o20666, os.makedev(1, 3))
    sm.import_tree(src, "base")
    tree = sm.create_branch("b", "base").tree
    try:
        flags = os.statvfs(tree).f_flag
        assert flags & os.ST_NOSUID and flags & os.ST_NODEV
        euid = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                               str(tree / "id"), "-u"], capture_output=True, text=True)
        assert euid.stdout.strip() == "65534", euid
        with pytest.raises(PermissionError):
            open(tree / "null", "rb")
    finally:
        sm.discard("b")
