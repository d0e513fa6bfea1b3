"""What an import may read, and the errno of everything else, through a real mount.

The class of bad sources: whatever is not a directory (a file, a FIFO, a device, a socket, a
path through a file) is ENOTDIR; whatever does not exist (a missing path, a dangling symlink)
is ENOENT; a symlink loop is ELOOP; the store itself, anything inside it (its layers, staging,
a branch's upper directory), the filesystem the store is served as (the mount, a snapshot,
a bind mount of one, a symlink into it) and any directory holding one of them are EINVAL:
such an import would read the staging directory it writes, or ask its own daemon for every
file. A branch's tree (a mount of its
own) and a symlink to a directory import what they show. Each case
goes through ``ctl`` (errno of the write and the reply line), the CLI (exit status 1 and the
errno name) and, for the store at rest, the offline CLI; none changes the store.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from pathlib import Path

import pytest

from cascowfs.cli import exit_status
from fusehelpers import Cascow, lazy_umount, mounted, needs_fuse, run_cli

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def fs():
    def populate(fs: Cascow) -> None:
        src = fs.base / "src"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "f").write_text("content\n")

    with mounted(populate=populate) as fs:
        assert fs.ctl(f"import base {fs.base / 'src'}")[0] == 0
        assert fs.ctl("branch b base")[0] == 0
        yield fs


def _bad_sources(fs: Cascow) -> dict[str, tuple[Path, int]]:
    """name -> (source path, errno), made under a scratch directory of ``fs``."""
    scratch = fs.base / "scratch"
    if not scratch.exists():
        scratch.mkdir()
        (scratch / "file").write_text("not a directory\n")
        os.mkfifo(scratch / "fifo")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(scratch / "socket"))
        sock.close()
        (scratch / "dangling").symlink_to(scratch / "nowhere")
        (scratch / "loop").symlink_to(scratch / "loop")
        (scratch / "to-mnt").symlink_to(fs.mnt / "snapshots")
    tree = Path(os.readlink(fs.mnt / "branches" / "b" / "tree"))
    return {
        "regular file": (scratch / "file", errno.ENOTDIR),
        "etc file": (Path("/etc/hostname"), errno.ENOTDIR),
        "fifo": (scratch / "fifo", errno.ENOTDIR),
        "socket": (scratch / "socket", errno.ENOTDIR),
        "char device": (Path("/dev/null"), errno.ENOTDIR),
        "path through a file": (scratch / "file" / "x", errno.ENOTDIR),
        "missing": (scratch / "missing", errno.ENOENT),
        "dangling symlink": (scratch / "dangling", errno.ENOENT),
        "symlink loop": (scratch / "loop", errno.ELOOP),
        "its own mount": (fs.mnt, errno.EINVAL),
        "a snapshot of its mount": (fs.mnt / "snapshots" / "base", errno.EINVAL),
        "its mount's ctl file": (fs.mnt / "ctl", errno.ENOTDIR),
        "a symlink into its mount": (scratch / "to-mnt", errno.EINVAL),
        "a branch directory of its mount": (fs.mnt / "branches" / "b", errno.EINVAL),
        "the store": (fs.store, errno.EINVAL),
        "the store's layers": (fs.store / "layers", errno.EINVAL),
        "a branch's upper directory": (tree.parent / "private" / "upper", errno.EINVAL),
        "the store's staging": (fs.store / "staging", errno.EINVAL),
        "a directory holding the store": (fs.base, errno.EINVAL),
    }


def _snapshots(fs: Cascow) -> list[str]:
    return sorted(os.listdir(fs.mnt / "snapshots"))


def test_ctl_import_of_a_bad_source_gets_its_errno_and_changes_nothing(fs):
    before = _snapshots(fs)
    for name, (src, want) in _bad_sources(fs).items():
        code, reply = fs.ctl(f"import bad {src}")
        assert code == want, (name, reply)
        assert reply.startswith(f"error {errno.errorcode[want]} ") and str(src) in reply, reply
    assert _snapshots(fs) == before


def test_cli_import_of_a_bad_source_exits_with_its_errno_class_and_name(fs):
    before = _snapshots(fs)
    for name, (src, want) in _bad_sources(fs).items():
        proc = run_cli("import", str(fs.mnt), str(src), "bad", check=False)
        assert proc.returncode == exit_status(want), (name, proc.stdout)
        assert f"{errno.errorcode[want]}: " in proc.stderr, (name, proc.stderr)
    assert _snapshots(fs) == before


def test_import_of_a_bind_mount_of_its_own_snapshot_is_refused(fs):
    bind = fs.base / "bind"
    bind.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(fs.mnt / "snapshots" / "base"), str(bind)],
                   check=True)
    try:
        code, reply = fs.ctl(f"import bad {bind}")
        assert code == errno.EINVAL, reply
    finally:
        lazy_umount(str(bind))


def test_import_of_a_directory_holding_a_mount_of_its_own_store_is_refused(fs):
    """The scan would walk into the mount and ask its own daemon for every snapshot."""
    holder = fs.base / "holder"
    (holder / "m").mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(fs.mnt), str(holder / "m")], check=True)
    try:
        code, reply = fs.ctl(f"import bad {holder}")
        assert code == errno.EINVAL and "a mount of the store" in reply, reply
    finally:
        lazy_umount(str(holder / "m"))
    assert fs.ctl(f"import holder {holder}") == (0, "ok holder")
    assert fs.ctl("prune holder")[0] == 0


@pytest.mark.parametrize("via", ["store", "mount"])
def test_a_branch_tree_imports_what_the_branch_shows(fs, via):
    """A branch's tree is a mount of its own (no store file shows through it), even though
    it lies inside the store: importing it snapshots the branch's view."""
    tree = Path(os.readlink(fs.mnt / "branches" / "b" / "tree"))
    (tree / "added").write_text("in the branch\n")
    try:
        src = tree if via == "store" else fs.mnt / "branches" / "b" / "tree"
        assert fs.ctl(f"import of-branch {src}") == (0, "ok of-branch")
        assert fs.ctl("commit b committed")[0] == 0
        assert run_cli("diff", str(fs.mnt), "committed", "of-branch").stdout == ""
    finally:
        (tree / "added").unlink()
        fs.ctl("discard b")
        for ident in ("of-branch", "committed"):
            fs.ctl(f"prune {ident}")
        assert fs.ctl("branch b base")[0] == 0


def test_a_relative_source_is_refused_by_ctl(fs):
    code, reply = fs.ctl("import bad src")
    assert code == errno.EINVAL and "absolute" in reply


def test_a_symlink_to_a_directory_imports_the_directory(fs):
    link = fs.base / "link-to-src"
    if not link.exists():
        link.symlink_to(fs.base / "src")
    assert fs.ctl(f"import via-link {link}") == (0, "ok via-link")
    assert (fs.mnt / "snapshots" / "via-link" / "sub" / "f").read_text() == "content\n"
    assert fs.ctl("prune via-link")[0] == 0


def test_offline_import_of_the_store_or_a_bad_source_is_refused(fs):
    fs.stop()
    try:
        for src, want in ((fs.store, "EINVAL"), (fs.store / "layers", "EINVAL"),
                          (Path("/etc/hostname"), "ENOTDIR"), (fs.base / "nowhere", "ENOENT")):
            proc = run_cli("import", str(fs.store), str(src), "bad", check=False)
            assert proc.returncode == exit_status(getattr(errno, want)), (src, proc.stderr)
            assert f"{want}: " in proc.stderr, (src, proc.stderr)
        assert run_cli("import", str(fs.store), str(fs.base / "src"), "offline").stdout.strip() \
            == "offline"
    finally:
        fs.start()
    assert (fs.mnt / "snapshots" / "offline" / "sub" / "f").read_text() == "content\n"
