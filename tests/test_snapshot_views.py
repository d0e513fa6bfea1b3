"""Kernel views of snapshots (cascowfs/fuse/kernel_views.py): MNT/snapshots/<id>/ served by
a read-only overlayfs once read, showing exactly what the daemon's own view shows, refusing
every write with EROFS, expiring when idle, detached on prune, cleaned up after kill -9; and
the layers a view stacks kept while it stands."""

from __future__ import annotations

import errno
import itertools
import os
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from cascowfs import images, overlay
from cascowfs.client import Client
from cascowfs.fsmeta import RESERVED_XATTR_PREFIX
from cascowfs.fuse.inodes import SnapDirNode
from cascowfs.fuse.kernel_views import IDLE_SECONDS, KernelViews, ViewBudget, _Turns
from cascowfs.fuse.operations import CascowOperations
from fusehelpers import Cascow, cascow_base, mounted, needs_fuse, run_cli
from support.mounts import abort_fuse
from support.properties import hypothesis_settings
from support.skips import needs_overlay
from support.views import assert_same_view, dir_view, snapshot_view
from test_fuse_snapshots import _build as build_every_kind

WAIT = 60.0  # seconds a view may take to come or go on a loaded machine (not a bound we test)

HOSTILE_NAMES = [
    "with space", "new\nline", "tab\there", "back\\slash", "-leading-dash", "colon:comma,",
    "lowerdir+=x", "..dots..", "x" * 255, os.fsdecode(b"latin1-\xe9\xff"), "ünïcødé", "*?[]",
]


def _build(src: Path) -> None:
    """Every kind of entry (test_fuse_snapshots's tree), forged names, hostile names."""
    build_every_kind(src)
    os.setxattr(src, "user.rootattr", b"on the root")
    # a tree may try to forge cascowfs's own names: import strips them
    os.setxattr(src / "dir" / "owned", "user.cascowfs.label.reward", b"99")
    os.setxattr(src, "user.cascowfs.parent", b"forged")
    hostile = src / "hostile"
    hostile.mkdir()
    for name in HOSTILE_NAMES:
        (hostile / name).write_bytes(os.fsencode(name) + b"\n")
        os.setxattr(hostile / name, "user.name", os.fsencode(name)[:200])
    (hostile / "sub dir\\,:").mkdir()
    (hostile / "sub dir\\,:" / "inner").write_text("inner\n")
    t = 1_000_000_000_123_456_789
    os.utime(src / "dir" / "owned", ns=(t, t))


def _edit(tree: Path) -> None:
    """A commit's worth of changes: edits, a deletion, a new file, a metadata change."""
    (tree / "dir" / "owned").write_text("changed\n")
    (tree / "rel-link").unlink()
    (tree / "dir" / "sub" / "new").write_text("new\n")
    os.chmod(tree / "dir", 0o750)
    (tree / "hostile" / "with space").unlink()


def _target(fs: Cascow, ident: str) -> Path:
    return fs.mnt / "snapshots" / ident


def _view_mounts(fs: Cascow, ident: str) -> list[overlay.MountRecord]:
    """The mounts of a snapshot's view: one on each directory and file at its root."""
    below = str(_target(fs, ident)) + "/"
    return [m for m in overlay.all_mounts() if m.target.startswith(below)]


def _view_mount(fs: Cascow, ident: str) -> overlay.MountRecord | None:
    found = _view_mounts(fs, ident)
    return found[0] if found else None


def _until(predicate, what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.02)


def _open_view(fs: Cascow, ident: str) -> None:
    """Read the snapshot once through the daemon, then wait until its view has bound every
    directory and file at its root (one at a time: a walk before that would mix views)."""
    root = os.fsencode(_target(fs, ident))
    bindable = sum(e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                   for e in os.scandir(root))
    _until(lambda: len(_view_mounts(fs, ident)) == bindable, f"view of {ident} mounted")


def _linked_view(root: Path) -> dict:
    """``dir_view`` with hard links only where ``st_nlink`` says so: the daemon's view gives
    identical files one inode number (they share the page cache) without linking them, the
    kernel view gives each file its layer's inode."""
    view = dir_view(root)
    base = os.fsencode(root)
    for rel, node in view.items():
        if node.links and os.lstat(base + b"/" + rel).st_nlink == 1:
            view[rel] = node._replace(links=None)
    return view


def _root_xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n) for n in os.listxattr(path)}


def _populated(fs: Cascow) -> None:
    _build(fs.base / "src")


def _snapshots(fs: Cascow) -> None:
    """s1 imported; s2 committed from a branch on it (a delta layer over s1's)."""
    with Client(fs.mnt) as client:
        client.import_tree(fs.base / "src", "s1", {"origin": "test", "reward": "0.5"})
        _edit(Path(client.branch("b", "s1")))
        client.commit("b", "s2", {"step": "2"})


@needs_fuse
def test_kernel_view_shows_exactly_the_fuse_view():
    with cascow_base() as base:
        (base / "a dir, with: hostile\\chars").mkdir()
        fs = Cascow(base / "a dir, with: hostile\\chars", views="fuse")
        _populated(fs)
        try:
            fs.start()
            _snapshots(fs)
            want = {i: _linked_view(_target(fs, i)) for i in ("s1", "s2")}
            want_xattrs = {i: _root_xattrs(_target(fs, i)) for i in ("s1", "s2")}
            with Client(fs.mnt) as client:
                want_diff = client.diff("s1", "s2")
            fs.stop()
            fs.views = "kernel"
            fs.start()
            for ident in ("s1", "s2"):
                _open_view(fs, ident)
                got = _linked_view(_target(fs, ident))
                assert_same_view(got, want[ident], f"kernel view of {ident}")
                # the recorded names on the root, exactly; none forged by the tree anywhere
                assert _root_xattrs(_target(fs, ident)) == want_xattrs[ident]
                assert "user.cascowfs.root" in want_xattrs[ident]
                assert os.getxattr(_target(fs, ident), "user.rootattr") == b"on the root"
                for dirpath, dirnames, filenames in os.walk(_target(fs, ident)):
                    for name in dirnames + filenames:
                        path = os.path.join(dirpath, name)
                        if os.path.islink(path):
                            continue
                        assert not any(os.fsencode(n).startswith(RESERVED_XATTR_PREFIX)
                                       for n in os.listxattr(path)), path
            assert want_xattrs["s1"]["user.cascowfs.label.origin"] == b"test"
            assert want_xattrs["s2"]["user.cascowfs.parent"] == b"s1"
            # the files the views show: a kernel view, in the mount table, on each directory
            # and file at the root; the root itself stays the daemon's
            bound = {os.fsencode(Path(m.target).name) for m in _view_mounts(fs, "s1")}
            src = os.fsencode(fs.base / "src")
            assert bound == {e.name for e in os.scandir(src)
                             if e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)}
            assert all(m.fstype == "overlay" and m.source.startswith("cascowfs-snapshot:")
                       for m in _view_mounts(fs, "s1"))
            assert os.statvfs(_target(fs, "s1") / "dir").f_flag & os.ST_RDONLY
            assert os.getxattr(_target(fs, "s1"), "user.cascowfs.tree")
            # Client.diff over two kernel views agrees with its walk of the daemon's views
            with Client(fs.mnt) as client:
                got_diff = client.diff("s1", "s2")
            assert got_diff == want_diff
            assert {c.path for c in got_diff} >= {"dir/owned", "dir/sub/new", "rel-link"}
        finally:
            fs.teardown()


@needs_fuse
def test_every_write_into_a_kernel_view_is_refused_with_erofs():
    with mounted(populate=_populated, views="kernel") as fs:
        _snapshots(fs)
        _open_view(fs, "s1")
        root = _target(fs, "s1")
        f, d = root / "dir" / "owned", root / "dir"
        attempts = {
            "open for writing": lambda: os.open(f, os.O_WRONLY),
            "open O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
            "create": lambda: os.open(d / "new", os.O_WRONLY | os.O_CREAT, 0o644),
            "mkdir": lambda: os.mkdir(d / "newdir"),
            "rmdir": lambda: os.rmdir(d / "sub"),
            "unlink": lambda: os.unlink(f),
            "rename": lambda: os.rename(f, d / "moved"),
            "symlink": lambda: os.symlink("x", d / "link"),
            "link": lambda: os.link(f, d / "hard"),
            "mknod": lambda: os.mkfifo(d / "fifo2"),
            "truncate": lambda: os.truncate(f, 0),
            "chmod": lambda: os.chmod(f, 0o600),
            "chown": lambda: os.chown(f, 1, 1),
            "utime": lambda: os.utime(f, ns=(1, 1)),
            "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
            "removexattr": lambda: os.removexattr(root / "big.bin", "user.kind"),
            "setxattr on the root": lambda: os.setxattr(root, "user.cascowfs.label.x", b"1"),
            "rename of the root": lambda: os.rename(root, root.parent / "renamed"),
            "mkdir in snapshots/": lambda: os.mkdir(root.parent / "handmade"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EROFS, what
        # an entry of the root is a mount point: the kernel refuses to remove it first
        for what, attempt in {"rmdir": lambda: os.rmdir(d),
                              "unlink": lambda: os.unlink(root / "big.bin"),
                              "rename": lambda: os.rename(d, root / "moved")}.items():
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EBUSY, f"{what} of a root entry"
        assert (root / "big.bin").is_file() and d.is_dir() and not (root / "moved").exists()
        assert (root / "dir" / "owned").read_text() == "owned\n"
        assert _view_mount(fs, "s1") is not None  # all of that was the kernel view's answer


@needs_fuse
@pytest.mark.parametrize("prune", ["ctl", "rmdir"])
def test_prune_detaches_the_view_and_an_open_file_reads_on(prune):
    with mounted(populate=_populated, views="kernel") as fs:
        _snapshots(fs)
        fs.ctl("discard b")
        _open_view(fs, "s2")
        layers = fs.store / "layers"
        before = set(os.listdir(layers))
        want = (fs.base / "src" / "big.bin").read_bytes()
        with open(_target(fs, "s2") / "big.bin", "rb") as fh:
            head = fh.read(4096)
            if prune == "ctl":
                code, reply = fs.ctl("prune s2")
                assert code == 0, reply
            else:  # the snapshot's own directory is no mount point: rmdir reaches the daemon
                os.rmdir(_target(fs, "s2"))
            assert _view_mount(fs, "s2") is None
            assert "s2" not in os.listdir(fs.mnt / "snapshots")
            code, reply = fs.ctl("gc")  # empties the trash: the layers it dropped go
            assert code == 0, reply
            assert head + fh.read() == want
        assert not _target(fs, "s2").exists()
        # the prune let go of the layers s2's view held (sooner than its idle expiry would)
        _until(lambda: set(os.listdir(layers)) < before, "s2's own layer dropped",
               within=IDLE_SECONDS / 2)
        _open_view(fs, "s1")  # the other snapshot's view is unaffected
        assert (_target(fs, "s1") / "big.bin").read_bytes() == want


def _rmdir_or_fail(fs: Cascow, path: Path) -> subprocess.CompletedProcess:
    """``rmdir path`` in a child. A daemon that never answers fails the test instead of
    hanging it: its connection is aborted (its threads may be waiting in the kernel for the
    very request, and kill -9 alone would leave it a zombie) and it is killed."""
    child = subprocess.Popen(["rmdir", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        _, err = child.communicate(timeout=WAIT / 2)
    except subprocess.TimeoutExpired:
        abort_fuse(fs.mnt)  # the child waits uninterruptibly for an answer sent to the daemon
        child.communicate()
        fs.kill9()
        pytest.fail(f"rmdir {path} got no answer: the daemon is stuck")
    return subprocess.CompletedProcess(child.args, child.returncode, "", err)


@needs_fuse
def test_rmdir_of_a_snapshot_never_read_neither_mounts_its_view_nor_hangs():
    """The kernel looks the snapshot up before it asks for the rmdir, holding MNT/snapshots
    and the snapshot's directory locked until the answer: a view mounted on that lookup would
    wait for the locks in its path lookups while the prune waited for the view."""
    with mounted(populate=_populated, views="kernel") as fs:
        _snapshots(fs)
        fs.ctl("discard b")
        done = _rmdir_or_fail(fs, _target(fs, "s2"))
        assert done.returncode == 0, done.stderr
        assert "s2" not in os.listdir(fs.mnt / "snapshots")
        assert _view_mounts(fs, "s2") == []
        # nor does a `stat` or `getfattr` of a snapshot: only a read inside it
        assert os.getxattr(_target(fs, "s1"), "user.cascowfs.label.reward") == b"0.5"
        assert os.stat(_target(fs, "s1")).st_mode & stat.S_IFDIR
        time.sleep(0.5)
        assert _view_mounts(fs, "s1") == []
        _open_view(fs, "s1")


@needs_fuse
def test_rmdir_racing_the_view_a_read_asked_for_prunes_and_leaks_no_mount():
    """A read inside a snapshot, then its rmdir at once: the view binds the root's entries
    while the rmdir holds the snapshot's directory, so its lookups wait for the rmdir's
    answer. The rmdir does not wait for the view: it prunes, detaches what is bound, and the
    view detaches what it binds afterwards."""
    with mounted(views="kernel") as fs, Client(fs.mnt) as client:
        src = fs.base / "src"
        for i in range(250):  # enough entries that the rmdir comes while they are bound
            (src / f"d{i}").mkdir(parents=True)
            (src / f"d{i}" / "f").write_text(f"{i}\n")
        for n in range(6):
            ident = f"r{n}"
            client.import_tree(src, ident)
            assert (_target(fs, ident) / "d0" / "f").read_text() == "0\n"  # asks for the view
            done = _rmdir_or_fail(fs, _target(fs, ident))
            assert done.returncode == 0, done.stderr
            assert ident not in os.listdir(fs.mnt / "snapshots")
            _until(lambda: _view_mounts(fs, ident) == [], f"the view of {ident} detached")
        assert [m for m in overlay.mounts_under(fs.mnt) if m.fstype == "overlay"] == []
        client.import_tree(src, "r0")  # a snapshot made again under a pruned id gets a view
        _open_view(fs, "r0")


@needs_fuse
def test_idle_entries_of_a_view_expire_and_busy_ones_stay():
    with mounted(populate=_populated, views="kernel", view_idle=0.2) as fs:
        _snapshots(fs)
        _open_view(fs, "s1")
        busy = str(_target(fs, "s1") / "dir")
        fd = os.open(busy, os.O_RDONLY)
        try:
            _until(lambda: [m.target for m in _view_mounts(fs, "s1")] == [busy],
                   "the idle entries of s1's view unmounted")
            # one in use is never unmounted, however many expiry rounds pass
            time.sleep(1.0)  # five expiry rounds
            assert [m.target for m in _view_mounts(fs, "s1")] == [busy]
            assert os.listdir(f"/proc/self/fd/{fd}") == os.listdir(busy)
        finally:
            os.close(fd)
        _until(lambda: not _view_mounts(fs, "s1"), "the view of s1 gone once idle")
        # the daemon's view serves again, and the next read that reaches it binds again
        assert (_target(fs, "s1") / "dir" / "owned").read_text() == "owned\n"
        assert sorted(os.listdir(_target(fs, "s1") / "dir"))
        _until(lambda: _view_mount(fs, "s1") is not None, "view of s1 mounted again")
        assert (_target(fs, "s1") / "dir" / "owned").read_text() == "owned\n"


@needs_fuse
def test_fuse_switch_keeps_every_snapshot_on_the_daemon():
    with mounted(populate=_populated, views="fuse") as fs:
        _snapshots(fs)
        for _ in range(2):
            os.listdir(_target(fs, "s1"))
            (_target(fs, "s1") / "dir" / "owned").read_text()
            fs.ctl("branch probe s1")  # a round trip: an attach would have started by now
        assert os.getxattr(_target(fs, "s1") / "dir", "user.cascowfs.tree")
        assert not [m for m in overlay.mounts_under(fs.mnt) if m.fstype == "overlay"]


@needs_fuse
@pytest.mark.parametrize("cleanup", ["umount --branches", "next mount", "next mount elsewhere"])
def test_kill9_leaves_views_the_next_mount_or_umount_detaches(cleanup):
    with mounted(populate=_populated, views="kernel") as fs:
        _snapshots(fs)
        _open_view(fs, "s1")
        _open_view(fs, "s2")
        fs.kill9()
        left = [m for m in overlay.mounts_under(fs.mnt) if m.fstype == "overlay"]
        assert {m.target for m in left} == {m.target for i in ("s1", "s2")
                                            for m in _view_mounts(fs, i)} != set()
        if cleanup.startswith("next mount"):
            old = fs.mnt
            if cleanup.endswith("elsewhere"):  # the dead mount goes too, views and all
                fs.mnt = fs.base / "elsewhere"
                fs.mnt.mkdir()
            fs.start()
            assert not overlay.mounts_under(old) or old == fs.mnt
            assert not [m for m in overlay.mounts_under(old) if m.fstype == "overlay"]
            _open_view(fs, "s1")
            assert (_target(fs, "s1") / "hl1").read_text() == "linked\n"
        else:
            run_cli("umount", "--branches", str(fs.mnt))
            assert not overlay.mounts_under(fs.base)


@needs_fuse
def test_umount_detaches_the_views_first():
    with mounted(populate=_populated, views="kernel") as fs:
        _snapshots(fs)
        _open_view(fs, "s1")
        fs.stop()  # cascowfs umount: not lazy, so a view left on MNT would make it EBUSY
        assert not [m for m in overlay.mounts_under(fs.mnt)]


@needs_fuse
def test_umount_without_branches_lets_go_of_the_image_a_view_stacked():
    """No branch stacks the snapshot's layer image, only its view: once MNT is gone nothing
    may keep the image mounted in the store (the store's disk could not be unmounted)."""

    def plain_tree(fs: Cascow) -> None:
        for i in range(3):
            path = fs.base / "src" / f"d{i}" / "file.txt"
            path.parent.mkdir(parents=True)
            path.write_text(f"{i}\n" * 100)

    if images.detect(images.AUTO, Path(tempfile.gettempdir())) == images.DIRECTORIES:
        pytest.skip("this machine mounts no EROFS image: views stack layer directories")
    with mounted(populate=plain_tree, views="kernel") as fs:
        with Client(fs.mnt) as client:
            client.import_tree(fs.base / "src", "s1")
        _open_view(fs, "s1")
        assert [m.fstype for m in overlay.mounts_under(fs.store)] == ["erofs"]
        fs.stop()
        assert [(m.target, m.fstype) for m in overlay.mounts_under(fs.base)] == []


@needs_fuse
def test_labels_at_the_caps_show_whole_from_whichever_view_serves_them():
    """Labels up to the caps may not fit the store filesystem's xattrs (plain ext4 keeps about
    4 KiB per inode): then the snapshot stays on the daemon's view, which shows them."""
    labels = {f"k{i:03d}": "v" * 200 for i in range(120)}
    with mounted(populate=_populated, views="kernel") as fs:
        with Client(fs.mnt) as client:
            client.import_tree(fs.base / "src", "big", labels)
            client.import_tree(fs.base / "src", "small", {"a": "b"})
        os.listdir(_target(fs, "big"))
        _open_view(fs, "small")  # attached after big's attempt: big's has been decided too
        root = _target(fs, "big")
        shown = {n[len("user.cascowfs.label."):]: os.getxattr(root, n).decode()
                 for n in os.listxattr(root) if n.startswith("user.cascowfs.label.")}
        assert shown == labels
        assert (root / "dir" / "owned").read_text() == "owned\n"


@needs_overlay
def test_layers_a_view_holds_outlive_a_rewrite_and_gc_until_released(sm, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x").write_text("x")
    sm.import_tree(src, "s1")
    tree = sm.create_branch("b", "s1").tree
    (tree / "d" / "y").write_text("y")
    sm.commit("b", "s2")
    sm.discard("b")
    sm.settle()
    chain, lowers = sm.hold_snapshot_layers("s2")
    assert len(chain) == 2  # s2's delta over s1's full layer
    held_again, _ = sm.hold_snapshot_layers("s2")  # a second view of it
    view = tmp_path / "view"
    view.mkdir()
    overlay.mount_overlay(view, lowers, readonly=True)
    try:
        sm.flatten("s2")  # a new chain: the delta is named by no chain any more
        sm.settle()
        sm.gc()
        assert all(p.is_dir() for p in lowers)
        assert_same_view(dir_view(view), snapshot_view(sm, "s2"), "view after the rewrite")
        sm.release_layers(chain)
        sm.settle()
        sm.gc()
        assert sm.layers.exists(chain[0])  # the second view still holds it
        sm.release_layers(held_again)
        sm.settle()
        sm.gc()
        assert not sm.layers.exists(chain[0])
        assert sm.layers.exists(chain[1])  # s1's own layer: s1 names it
    finally:
        overlay.unmount(view)


ROOT_NAMES = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@needs_fuse
def test_any_names_at_a_snapshots_root_are_bound_shown_and_detached():
    """Every entry at the root is a mount point of the view: its name travels through
    openat, move_mount, umount2 and the mount table's escapes."""
    with mounted(views="kernel") as fs, Client(fs.mnt) as client:
        serial = itertools.count()

        @hypothesis_settings(15)
        @given(st.lists(st.tuples(ROOT_NAMES, st.booleans()), min_size=1, max_size=6,
                        unique_by=lambda t: t[0]))
        def check(entries: list[tuple[bytes, bool]]) -> None:
            ident = f"p{next(serial)}"
            src = fs.base / ident
            src.mkdir()
            for name, is_dir in entries:
                path = os.fsencode(src) + b"/" + name
                if is_dir:
                    os.mkdir(path)
                    with open(path + b"/inner", "wb") as fh:
                        fh.write(name)
                else:
                    with open(path, "wb") as fh:
                        fh.write(name)
            client.import_tree(src, ident)
            _open_view(fs, ident)
            _until(lambda: len(_view_mounts(fs, ident)) == len(entries), "every entry bound")
            bound = {os.fsencode(Path(m.target).name) for m in _view_mounts(fs, ident)}
            assert bound == {name for name, _ in entries}
            assert_same_view(dir_view(_target(fs, ident)), dir_view(src), f"view of {ident}")
            client.prune(ident)
            assert _view_mounts(fs, ident) == []

        check()


@needs_fuse
@needs_overlay
def test_a_walk_under_way_stays_on_one_view_and_keeps_hard_links():
    """`cp -a` of a snapshot nobody read: the first directory it opens asked for the view,
    which used to be bound halfway through the copy, so the two names of a hard-linked file
    came from two filesystems (another device and inode) and the copy split them. The view
    is bound once the walk's last directory of the snapshot is closed."""
    def populate(fs: Cascow) -> None:
        src = fs.base / "src"
        (src / "a").mkdir(parents=True)
        (src / "b").mkdir()
        for i in range(300):
            (src / "a" / f"f{i:03d}").write_text(f"{i}\n")
        (src / "a" / "zz").write_text("linked\n")
        os.link(src / "a" / "zz", src / "b" / "zz")

    with mounted(populate=populate, views="kernel") as fs:
        assert fs.ctl(f"import linked {fs.base / 'src'}")[0] == 0
        root = _target(fs, "linked")
        walking = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # a walk holds its root open
        try:
            first = os.lstat(root / "a" / "zz")
            time.sleep(1)  # time enough to bind a view, were it asked for now
            assert _view_mounts(fs, "linked") == []
            second = os.lstat(root / "b" / "zz")
            assert (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
        finally:
            os.close(walking)
        _until(lambda: len(_view_mounts(fs, "linked")) == 2, "view bound after the walk")
        for n in range(2):  # a walk that binds the view, and one that finds it bound
            copy = fs.base / f"copy{n}"
            subprocess.run(["cp", "-a", str(_target(fs, "linked")), str(copy)], check=True)
            assert os.stat(copy / "a" / "zz").st_ino == os.stat(copy / "b" / "zz").st_ino, n
            assert os.stat(copy / "b" / "zz").st_nlink == 2
            _until(lambda: len(_view_mounts(fs, "linked")) == 2, "view of linked mounted")


# A budget of 12 mounts, 6 for a uid outside the admin group: each snapshot below binds two
# entries and stacks one layer, so a view costs 3 (kernel_views.py, Budget), 4 views in all.
BUDGET = {"CASCOWFS_SNAPSHOT_VIEWS_MAX": "12", "CASCOWFS_SNAPSHOT_VIEWS_UID_MAX": "6"}
NOBODY = 65534


def _two_entries(fs: Cascow) -> None:
    src = fs.base / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x").write_text("x\n")
    (src / "f").write_text("f\n")
    os.chmod(fs.base, 0o755)


def _budgeted(fs: Cascow, count: int) -> list[str]:
    idents = [f"s{i}" for i in range(count)]
    for ident in idents:
        assert fs.ctl(f"import {ident} {fs.base / 'src'}")[0] == 0
    return idents


def _all_view_mounts(fs: Cascow) -> list[overlay.MountRecord]:
    return [m for m in overlay.all_mounts() if m.source.startswith("cascowfs-snapshot:")
            and m.target.startswith(str(fs.mnt) + "/")]


def _bound(fs: Cascow) -> dict[str, int]:
    """Snapshot -> its entries bound now; never past the budget (12 mounts, 2 per view and
    one layer each, so 8 entries at most)."""
    found: dict[str, int] = {}
    for m in _all_view_mounts(fs):
        ident = Path(m.target).parent.name
        found[ident] = found.get(ident, 0) + 1
    held = sum(found.values()) + len(found)
    assert held <= int(BUDGET["CASCOWFS_SNAPSHOT_VIEWS_MAX"]), found
    return found


def _read_as(fs: Cascow, ident: str, user: int | None = None) -> None:
    """Read one file of snapshot ``ident`` (as ``user``), as the reviewer's reader did."""
    got = fs.sh(f'cat "$MNT/snapshots/{ident}/f" && ls "$MNT/snapshots/{ident}/d"', user=user)
    assert got.stdout == "f\nx\n", got.stdout


@needs_fuse
def test_views_of_all_snapshots_share_one_budget_evicting_the_least_recently_used(monkeypatch):
    """Views used to be bounded per snapshot only: `nobody` reading a file of each of 395
    snapshots filled the host's mount table (100,000) in 15 s, and root's next branch and
    every other mount failed with ENOSPC. Views now stay within one budget: past it, a
    view takes the room of the least recently used ones, of which entries in use stay
    (idle ones go first) and a snapshot being walked stays whole; when none can go, the
    snapshot is served by the daemon."""
    for name, value in BUDGET.items():
        monkeypatch.setenv(name, value)
    images_mount = images.detect(images.AUTO, Path(tempfile.gettempdir())) != images.DIRECTORIES
    with mounted(populate=_two_entries, views="kernel", view_idle=600) as fs:
        idents = _budgeted(fs, 6)
        for ident in idents[:4]:
            _read_as(fs, ident)
            _until(lambda: _bound(fs).get(ident) == 2, f"view of {ident} bound")
        assert _bound(fs) == {"s0": 2, "s1": 2, "s2": 2, "s3": 2}
        busy = os.open(_target(fs, "s0") / "d", os.O_RDONLY)  # s0 is the least recently used
        walk = os.open(_target(fs, "s1"), os.O_RDONLY | os.O_DIRECTORY)  # s1 is being walked
        held: list[int] = [busy, walk]
        try:
            _read_as(fs, "s4")
            _until(lambda: _bound(fs).get("s4") == 2, "view of s4 bound")
            # s0's idle entry went, its busy one stayed; s1, walked, stayed; s2 went whole
            assert _bound(fs) == {"s0": 1, "s1": 2, "s3": 2, "s4": 2}
            if images_mount:  # s2's layer image went with its view: one per view left
                assert len([m for m in overlay.mounts_under(fs.store)
                            if m.fstype == "erofs"]) == 4
            assert [m.target for m in _view_mounts(fs, "s0")] == [str(_target(fs, "s0") / "d")]
            held.remove(walk)
            os.close(walk)
            _read_as(fs, "s2")  # evicted: read through the daemon, which binds it again
            _until(lambda: _bound(fs).get("s2") == 2, "view of s2 bound again")
            assert _bound(fs) == {"s0": 1, "s2": 2, "s3": 2, "s4": 2}  # s1 was the oldest
            for m in _all_view_mounts(fs):  # every entry in use: nothing can be evicted
                if m.target != str(_target(fs, "s0") / "d"):
                    held.append(os.open(m.target, os.O_RDONLY))
            _read_as(fs, "s5")
            _until(lambda: "snapshot s5 stays on the FUSE view" in fs.log_text(),
                   "s5 left on the FUSE view")
            assert _bound(fs) == {"s0": 1, "s2": 2, "s3": 2, "s4": 2}
            _read_as(fs, "s5")
            assert os.getxattr(_target(fs, "s5") / "d", "user.cascowfs.tree")  # the daemon's
        finally:
            for fd in held:
                os.close(fd)

        def s5_bound() -> bool:
            os.listdir(_target(fs, "s5"))  # an opendir reaches the daemon: asks for the view
            return _bound(fs).get("s5") == 2

        _until(s5_bound, "view of s5 bound once the others are idle")
        _read_as(fs, "s5")


@needs_fuse
def test_a_user_outside_the_admin_group_binds_its_share_and_evicts_no_admins_view(monkeypatch):
    """One user's views take a quarter of the budget at most (its own least recently used
    go first); an admin's view takes the room of other users' idle views, never the
    reverse: the user's read is then served by the daemon."""
    for name, value in BUDGET.items():
        monkeypatch.setenv(name, value)
    with mounted(populate=_two_entries, views="kernel", view_idle=600) as fs:
        idents = _budgeted(fs, 6)
        for n, ident in enumerate(idents[:4]):
            _read_as(fs, ident, user=NOBODY)
            _until(lambda: _bound(fs).get(ident) == 2, f"nobody's view of {ident} bound")
            assert len(_bound(fs)) == min(n + 1, 2), _bound(fs)  # 6 mounts: two views
        assert _bound(fs) == {"s2": 2, "s3": 2}
        for ident in ("s4", "s5"):
            _read_as(fs, ident)
            _until(lambda: _bound(fs).get(ident) == 2, f"root's view of {ident} bound")
        assert _bound(fs) == {"s2": 2, "s3": 2, "s4": 2, "s5": 2}
        for ident in ("s0", "s1"):  # root's views take the room of nobody's, oldest first
            _read_as(fs, ident)
            _until(lambda: _bound(fs).get(ident) == 2, f"root's view of {ident} bound")
        assert _bound(fs) == {"s0": 2, "s1": 2, "s4": 2, "s5": 2}
        _read_as(fs, "s2", user=NOBODY)  # no room nobody may make: the daemon serves it
        _until(lambda: "for uid 65534" in fs.log_text(), "nobody's view refused")
        time.sleep(0.5)
        assert _bound(fs) == {"s0": 2, "s1": 2, "s4": 2, "s5": 2}
        _read_as(fs, "s2", user=NOBODY)


# -- the attaches' queue (kernel_views.py, Queue): no mount ---------------------------------
def test_attaches_readers_ask_for_wait_apart_few_and_behind_a_detach(sm, store, tmp_path):
    """Any user's read in a snapshot asks for its view's attach. They used to queue without
    bound in trio's default pool of 40 threads, FIFO, in front of every commit, branch and
    status: one user opening every snapshot's root in a loop made every agent wait for
    all of them. Now attaches run in a thread of their own, one waits per uid outside the
    admin group and four of all such uids (root's: one per snapshot), the shared threads
    answer at once, and a prune's detach goes before every attach waiting."""
    views = KernelViews(sm, tmp_path / "mnt", budget=ViewBudget.of(100))
    ops = CascowOperations(sm, store, views=views)
    gate = threading.Event()
    ran: list[str] = []

    def plan(ident: str) -> tuple[list[bytes], list[str]]:
        gate.wait()  # the attach running holds its turn until the test lets it go
        ran.append(ident)
        return [], []  # nothing at its root: nothing to mount

    detach_held = views._detach_held

    def detached(ident: str) -> None:
        ran.append(f"detach {ident}")
        detach_held(ident)

    views._plan = plan
    views._detach_held = detached

    def caller(uid: int) -> SimpleNamespace:
        return SimpleNamespace(uid=uid, gid=uid, pid=os.getpid())

    async def until(predicate) -> None:
        with trio.fail_after(WAIT):  # a hang guard, not a bound under test
            while not predicate():
                await trio.sleep(0.01)

    async def main() -> None:
        try:
            shared = trio.to_thread.current_default_thread_limiter()
            for i in range(300):  # ten users outside the admin group read in every snapshot
                node = SnapDirNode(ops.table.allocate(), snap=f"s{i}")
                ops._want_view(node, caller(2000 + i % 10))
            for ident in ("r0", "r1"):  # root reads in two more
                ops._want_view(SnapDirNode(ops.table.allocate(), snap=ident), caller(0))
            await until(lambda: views.attaching.statistics().tasks_waiting == 5)
            assert views.attaching.borrowed_tokens == 1  # the one attach running
            assert sorted(views._pending) == ["r0", "r1", "s0", "s1", "s2", "s3"]
            assert shared.borrowed_tokens == 0
            assert await ops._q(lambda: "answered") == "answered"  # while the attach runs
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ops._detach_view, "r1")  # as a prune of r1 through ctl
                await until(lambda: views._turns.first == 1)  # waiting for the attach running
                gate.set()
            await until(lambda: not views._pending)
        finally:  # or, past a failure above, attach threads would wait for good
            gate.set()

    trio.run(main)
    assert ran[1] == "detach r1", ran  # right after the attach running when it came
    attaches = ran[:1] + ran[2:]
    assert sorted(attaches) == ["r0", "r1", "s0", "s1", "s2", "s3"]
    assert not views._waiting and not views._waiting_of


def test_a_detach_waiting_goes_before_every_attach_waiting():
    turns = _Turns()
    order: list[str] = []

    def take(what: str, first: bool) -> None:
        with turns.turn(first):
            order.append(what)

    def until(predicate) -> None:
        deadline = time.monotonic() + WAIT  # a hang guard, not a bound under test
        while not predicate():
            assert time.monotonic() < deadline
            time.sleep(0.001)

    threads = [threading.Thread(target=take, args=(f"attach {i}", False)) for i in range(3)]
    threads.append(threading.Thread(target=take, args=("detach", True)))
    with turns.turn(first=False):  # an attach running
        for thread in threads[:3]:
            thread.start()
        until(lambda: len(turns._changed._waiters) == 3)  # the attaches wait, in order
        threads[3].start()
        until(lambda: turns.first == 1)
    for thread in threads:
        thread.join()
    assert order[0] == "detach", order
    assert sorted(order[1:]) == ["attach 0", "attach 1", "attach 2"]
