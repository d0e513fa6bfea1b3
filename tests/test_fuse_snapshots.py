"""Snapshot trees served from the CAS: every attribute, every kind of file, inode numbers,
xattrs, `.`/`..`, big directories and files, statfs — compared with the source tree."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

import pytest

from fusehelpers import Cascow, mounted, needs_fuse

pytestmark = needs_fuse

BIG = 3 * 1024 * 1024 + 12345


def _build(src: Path) -> None:
    rnd = random.Random(7)
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "wide").mkdir()
    for i in range(3000):  # more than one readdir buffer
        (src / "wide" / f"entry-{i:05d}").write_text(str(i))
    (src / "big.bin").write_bytes(rnd.randbytes(BIG))
    (src / "empty").write_bytes(b"")
    (src / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "exec.sh", 0o755)
    (src / "dir" / "owned").write_text("owned\n")
    os.chown(src / "dir" / "owned", 1234, 5678)
    os.chmod(src / "dir" / "sub", 0o700)
    (src / "dir" / "setuid").write_text("x")
    os.chmod(src / "dir" / "setuid", 0o4755)
    (src / "hl1").write_text("linked\n")
    os.link(src / "hl1", src / "dir" / "hl2")
    os.link(src / "hl1", src / "dir" / "sub" / "hl3")
    os.symlink("dir/owned", src / "rel-link")
    os.symlink("/etc/hostname", src / "abs-link")
    os.symlink("nowhere", src / "dangling")
    os.mkfifo(src / "fifo")
    os.mknod(src / "chardev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (src / os.fsdecode(b"caf\xe9-latin1")).write_text("bytes name\n")
    (src / "ünïcødé").write_text("utf-8 name\n")
    os.setxattr(src / "big.bin", "user.kind", b"random")
    os.setxattr(src / "dir", "user.dirattr", b"on a directory")
    os.setxattr(src / "empty", "user.empty-value", b"")
    (src / "twin-a").write_text("same\n")
    (src / "twin-b").write_text("same\n")
    t = 1_000_000_000_123_456_789
    for p in (src / "twin-a", src / "twin-b"):
        os.utime(p, ns=(t, t))
    os.utime(src / "exec.sh", ns=(t, t + 5))


@pytest.fixture(scope="module")
def fs():
    def populate(fs: Cascow) -> None:
        _build(fs.base / "src")

    with mounted(populate=populate) as fs:
        for ident in ("s1", "s2"):
            code, reply = fs.ctl(f"import {ident} {fs.base / 'src'} origin=test")
            assert code == 0, reply
        yield fs


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            out.append(Path(os.fsdecode(os.path.join(dirpath, name))).relative_to(root))
    return sorted(out)


def test_every_entry_matches_the_source(fs):
    src, snap = fs.base / "src", fs.mnt / "snapshots" / "s1"
    paths = _walk(src)
    assert _walk(snap) == paths
    for rel in paths:
        a, b = os.lstat(src / rel), os.lstat(snap / rel)
        assert (stat.S_IFMT(a.st_mode), stat.S_IMODE(a.st_mode)) == \
            (stat.S_IFMT(b.st_mode), stat.S_IMODE(b.st_mode)), rel
        assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), rel
        if not stat.S_ISDIR(a.st_mode):
            assert a.st_size == b.st_size, rel
            assert a.st_mtime_ns == b.st_mtime_ns, rel
            assert a.st_nlink == b.st_nlink, rel
            assert a.st_rdev == b.st_rdev, rel
        if stat.S_ISREG(a.st_mode):
            assert (src / rel).read_bytes() == (snap / rel).read_bytes(), rel
        if stat.S_ISLNK(a.st_mode):
            assert os.readlink(src / rel) == os.readlink(snap / rel), rel
        if not stat.S_ISLNK(a.st_mode):
            names = sorted(n for n in os.listxattr(src / rel) if n.startswith("user."))
            assert sorted(os.listxattr(snap / rel)) == names, rel
            for n in names:
                assert os.getxattr(src / rel, n) == os.getxattr(snap / rel, n), (rel, n)


def test_inode_numbers(fs):
    s1, s2 = fs.mnt / "snapshots" / "s1", fs.mnt / "snapshots" / "s2"
    # identical files share a nodeid (and so the page cache) across snapshots ...
    for rel in ("big.bin", "empty", "dir/owned", "wide/entry-00042", "rel-link", "fifo"):
        assert os.lstat(s1 / rel).st_ino == os.lstat(s2 / rel).st_ino, rel
    # ... while every directory has its own: a nodeid never appears under two parents
    dirs = [os.stat(p).st_ino for p in (s1, s2, s1 / "dir", s2 / "dir", s1 / "dir" / "sub",
                                        s2 / "dir" / "sub", s1 / "wide", s2 / "wide")]
    assert len(set(dirs)) == len(dirs)
    # hard links are one inode with the right link count
    inos = {os.stat(s1 / p).st_ino for p in ("hl1", "dir/hl2", "dir/sub/hl3")}
    assert len(inos) == 1 and os.stat(s1 / "hl1").st_nlink == 3
    # every derived number fits a double exactly (JavaScript's st_ino)
    assert all(os.lstat(s1 / p).st_ino < 2**53 for p in _walk(s1)[:200])
    # stable: a second lookup gives the same numbers
    assert os.stat(s1 / "dir").st_ino == os.stat(s1 / "dir").st_ino


def test_dot_and_dotdot(fs):
    s1 = fs.mnt / "snapshots" / "s1"
    assert os.stat(s1 / "dir" / "sub" / "..").st_ino == os.stat(s1 / "dir").st_ino
    assert os.stat(s1 / "dir" / ".").st_ino == os.stat(s1 / "dir").st_ino
    assert os.stat(s1 / "..").st_ino == os.stat(fs.mnt / "snapshots").st_ino
    assert os.stat(fs.mnt / "snapshots" / "..").st_ino == os.stat(fs.mnt).st_ino
    listing = fs.sh('ls -a "$MNT/snapshots/s1/dir"').stdout.split()
    assert listing[:2] == [".", ".."]
    # a process whose cwd is deep inside still resolves ".." after the kernel forgot things
    out = fs.sh('cd "$MNT/snapshots/s1/dir/sub" && echo 2 > /proc/sys/vm/drop_caches && '
                'cd .. && pwd -P && ls').stdout.split()
    assert out[0] == str(s1 / "dir") and "owned" in out


def test_big_directory_and_file(fs):
    s1 = fs.mnt / "snapshots" / "s1"
    assert sorted(os.listdir(s1 / "wide")) == [f"entry-{i:05d}" for i in range(3000)]
    src = (fs.base / "src" / "big.bin").read_bytes()
    assert hashlib.sha256((s1 / "big.bin").read_bytes()).digest() == hashlib.sha256(src).digest()
    rnd = random.Random(1)
    fd = os.open(s1 / "big.bin", os.O_RDONLY)
    try:
        for _ in range(200):
            off = rnd.randrange(0, BIG + 10)
            size = rnd.choice([1, 4095, 4096, 65536, 200_000])
            assert os.pread(fd, size, off) == src[off:off + size]
    finally:
        os.close(fd)
    with open(s1 / "big.bin", "rb") as fh:  # mmap works (page cache)
        import mmap

        with mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[BIG - 100:] == src[-100:]


def test_special_files_and_names(fs):
    s1 = fs.mnt / "snapshots" / "s1"
    assert stat.S_ISFIFO(os.lstat(s1 / "fifo").st_mode)
    st = os.lstat(s1 / "chardev")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert (s1 / os.fsdecode(b"caf\xe9-latin1")).read_text() == "bytes name\n"
    assert (s1 / "ünïcødé").read_text() == "utf-8 name\n"
    assert os.readlink(s1 / "abs-link") == "/etc/hostname"
    assert (s1 / "rel-link").read_text() == "owned\n"
    # mounted nosuid,nodev: the mode bits are kept but grant nothing
    assert os.stat(s1 / "dir" / "setuid").st_mode & stat.S_ISUID


def test_snapshot_root_metadata(fs):
    s1 = fs.mnt / "snapshots" / "s1"
    names = set(os.listxattr(s1))
    assert {"user.cascowfs.root", "user.cascowfs.created", "user.cascowfs.size",
            "user.cascowfs.files", "user.cascowfs.label.origin"} <= names
    assert "user.cascowfs.parent" not in names  # an import has no parent
    assert "user.cascowfs.tree" not in names  # served, not listed
    root = os.getxattr(s1, "user.cascowfs.root").decode()
    assert len(root) == 64 and int(root, 16) >= 0
    assert os.getxattr(s1, "user.cascowfs.label.origin") == b"test"
    assert int(os.getxattr(s1, "user.cascowfs.files")) == \
        sum(1 for p in _walk(fs.base / "src") if (fs.base / "src" / p).is_file()
            and not (fs.base / "src" / p).is_symlink())
    created = os.getxattr(s1, "user.cascowfs.created").decode()
    assert created.endswith("Z") and created[:2] == "20"
    # identical trees: same digest; the hidden per-directory tree id too
    s2 = fs.mnt / "snapshots" / "s2"
    assert os.getxattr(s2, "user.cascowfs.root").decode() == root
    assert os.getxattr(s1 / "dir", "user.cascowfs.tree") == \
        os.getxattr(s2 / "dir", "user.cascowfs.tree")
    # getfattr, as docs/interface.md shows it
    out = fs.sh('getfattr -d -m user.cascowfs "$MNT/snapshots/s1"').stdout
    assert f'user.cascowfs.root="{root}"' in out and 'label.origin="test"' in out


def test_statfs(fs):
    st = os.statvfs(fs.mnt / "snapshots" / "s1")
    assert st.f_namemax == 255 and st.f_blocks > 0 and st.f_bsize > 0
    store = os.statvfs(fs.store)
    assert st.f_blocks == store.f_blocks  # the store disk's space is what commits can use


def test_inode_numbers_are_keyed_per_mount(fs):
    """Files' numbers are keyed with a secret of the mount's, so that a lister cannot work
    out a number from a guess of the content: mounted again, each file has another number,
    and identical files and hard links still share theirs. (Last: it restarts the daemon.)"""
    s1, s2 = fs.mnt / "snapshots" / "s1", fs.mnt / "snapshots" / "s2"
    files = ("big.bin", "empty", "dir/owned", "dir/setuid", "hl1", "twin-a", "rel-link", "fifo")
    before = {rel: os.lstat(s1 / rel).st_ino for rel in files}
    fs.stop()
    fs.start()
    after = {rel: os.lstat(s1 / rel).st_ino for rel in files}
    assert all(before[rel] != after[rel] for rel in files), (before, after)
    assert all(os.lstat(s2 / rel).st_ino == after[rel] for rel in files)
    assert os.lstat(s1 / "twin-b").st_ino == after["twin-a"]
    assert {os.stat(s1 / p).st_ino for p in ("dir/hl2", "dir/sub/hl3")} == {after["hl1"]}
