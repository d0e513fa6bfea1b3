"""Shared fixtures and helpers for the engine tests (StateManager in-process, real overlayfs).

Other test modules may import the helpers below (``from conftest import dir_view, ...``); the
names and signatures listed here are kept stable.

Skip conditions (each a ``pytest.mark.skipif`` with a clear reason)
    ``needs_overlay``   root and a kernel whose overlayfs takes ``lowerdir+`` (fsconfig)
    ``needs_loop``      ``needs_overlay`` plus loop devices, ``losetup`` and ``mkfs.ext4``
    ``overlay_unavailable()`` / ``loop_unavailable()``  the reason as a string, or None

Fixtures
    ``store``           path of a fresh (not yet opened) store directory under ``tmp_path``
    ``sm``              a ``StateManager`` opened on ``store``; closed in ``finally`` with
                        ``unmount_branches=True``, after which no mount may remain under it

Context managers
    ``open_store(path)``        the same as the ``sm`` fixture, for tests that reopen stores
    ``loop_ext4(dir, size_mib)`` a fresh journaled ext4 on a loop device, mounted; always
                                unmounted and ``losetup -d``-ed in ``finally``

Comparable views: ``{relative path (bytes, b"" = root): Node}``
    ``dir_view(path)``          what a reader of a real directory (a branch, a source tree) sees
    ``snapshot_view(sm, id)``   the same, walked from the CAS via root_entry/read_tree/read_file
    ``assert_same_view(got, want, what)``  equality with a readable list of differing paths
    ``expected_status(before, after)``     the A/M/D lines a status/diff must contain
    ``assert_status(changes, before, after, what)``  status/diff checked against that oracle

Store checks (the invariants of docs/architecture.md, via ``cascowfs.fsck``)
    ``assert_fsck_clean(store, deep=True)``  on a closed store (fsck takes the store lock);
                                             close it with ``sm.close()``, not
                                             ``unmount_branches=True``: invariant 4 wants every
                                             live branch mounted
    ``check_live(sm, deep=False)``           on an open store, under its operation lock

Mounts
    ``all_mounts()`` / ``mounts_below(path)``  from /proc/self/mountinfo (``Mount`` tuples)
    ``force_unmount_below(path)``              lazy umount of everything there (clean-up only)

Processes
    ``descendant_processes(pid)``  (pid, state, command) of live descendants of ``pid``
    ``run_child(code, *args, crash_at=None)``  ``python -c code args`` with ``CASCOWFS_CRASH_AT``
    ``child_env(crash_at=None)``                the environment such a child gets

Hypothesis
    ``hypothesis_settings(n)``  settings for a property run of ``n`` examples (no deadline: the
                                examples mount real filesystems); ``CASCOWFS_TEST_EXAMPLES=10``
                                multiplies every ``n`` by 10 for a thorough run

Session end: a hook fails the run if an overlay/FUSE mount made by this run, a store staging
directory under the run's temp dir, a child process or a StateManager background thread is
left behind (and then cleans the leaked mounts up, so one bad test does not poison the VM).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest
from hypothesis import HealthCheck, settings

from cascowfs import overlay
from cascowfs.fsmeta import RESERVED_XATTR_PREFIX

REPO = Path(__file__).resolve().parent.parent
OVERLAY_PREFIX = b"trusted.overlay."


# ----------------------------------------------------------------------------------------
# hypothesis
# ----------------------------------------------------------------------------------------
EXAMPLES_SCALE = float(os.environ.get("CASCOWFS_TEST_EXAMPLES", "1") or 1)
settings.register_profile(
    "cascowfs-engine", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def hypothesis_settings(max_examples: int, **kw) -> settings:
    """Settings for one property: ``max_examples`` scaled by ``CASCOWFS_TEST_EXAMPLES``."""
    return settings(settings.get_profile("cascowfs-engine"),
                    max_examples=max(1, int(max_examples * EXAMPLES_SCALE)), **kw)


# ----------------------------------------------------------------------------------------
# skip conditions
# ----------------------------------------------------------------------------------------
@functools.cache
def overlay_unavailable() -> str | None:
    """Why real branch mounts cannot work here (None if they can): tried for real, once."""
    if os.geteuid() != 0:
        return "needs root (overlayfs mounts)"
    try:
        with open("/proc/filesystems") as fh:
            if "overlay" not in fh.read():
                subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
    except OSError:
        pass
    try:
        from cascowfs import overlay
    except Exception as exc:  # pragma: no cover - import problems are reported by other tests
        return f"cannot import cascowfs.overlay: {exc}"
    base = Path(tempfile.mkdtemp(prefix="cascowfs-probe-"))
    try:
        for d in ("lower", "upper", "work", "mnt"):
            (base / d).mkdir()
        (base / "lower" / "f").write_text("x")
        try:
            overlay.mount_overlay(base / "mnt", [base / "lower"], base / "upper", base / "work")
        except Exception as exc:
            return f"overlayfs with lowerdir+ (fsconfig) is not available: {exc}"
        try:
            ok = (base / "mnt" / "f").read_text() == "x"
        finally:
            overlay.unmount(base / "mnt", lazy=False)
        return None if ok else "overlayfs mount does not show its lower layer"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@functools.cache
def loop_unavailable() -> str | None:
    why = overlay_unavailable()
    if why:
        return why
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


needs_overlay = pytest.mark.skipif(overlay_unavailable() is not None,
                                   reason=overlay_unavailable() or "")
needs_loop = pytest.mark.skipif(loop_unavailable() is not None, reason=loop_unavailable() or "")


# ----------------------------------------------------------------------------------------
# mounts
# ----------------------------------------------------------------------------------------
Mount = overlay.MountRecord  # (mount_id, target, fstype, source, options)
all_mounts = overlay.all_mounts


def mounts_below(base: Path | str) -> list[Mount]:
    """Mounts at or below ``base``."""
    prefix = str(base).rstrip("/")
    return [m for m in all_mounts() if m.target == prefix or m.target.startswith(prefix + "/")]


def force_unmount_below(base: Path | str) -> list[str]:
    """Lazily unmount everything at or below ``base`` (deepest first); returns the targets."""
    targets = sorted({m.target for m in mounts_below(base)}, key=len, reverse=True)
    for t in targets:
        subprocess.run(["umount", "-l", t], capture_output=True, check=False)
    return targets


# ----------------------------------------------------------------------------------------
# stores
# ----------------------------------------------------------------------------------------
_STORES: list[Path] = []  # every store opened through these helpers (for the leak check)


@contextlib.contextmanager
def open_store(path: Path, **kw) -> Iterator["StateManager"]:  # noqa: F821
    """An open StateManager; closed with ``unmount_branches=True`` in ``finally``, and then no
    mount may remain under the store (if one does, it is removed and the test fails)."""
    from cascowfs.state import StateManager

    path = Path(path)
    _STORES.append(path)
    sm = StateManager.open(path, **kw)
    try:
        yield sm
    finally:
        try:
            sm.close(unmount_branches=True)
        finally:
            left = force_unmount_below(path)
            assert not left, f"close(unmount_branches=True) left mounts: {left}"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    if overlay_unavailable():
        pytest.skip(overlay_unavailable())
    return tmp_path / "store"


@pytest.fixture
def content(tmp_path: Path):
    """A content store over a fresh LMDB environment (no mounts needed)."""
    from cascowfs.cas import ContentStore
    from cascowfs.metadb import MetaDB

    db = MetaDB(tmp_path / "meta")
    try:
        yield ContentStore(db)
    finally:
        db.close()


@pytest.fixture
def sm(store: Path):
    with open_store(store) as manager:
        yield manager


def assert_fsck_clean(store: Path, *, deep: bool = True) -> None:
    """All five invariants hold on a closed store (branches must still be mounted)."""
    from cascowfs.fsck import fsck_store

    report = fsck_store(store, deep=deep)
    assert report.ok, "fsck found problems:\n  " + "\n  ".join(report.problems)


def check_live(sm, *, deep: bool = False) -> None:
    """fsck's checks on an open store, with no state change running meanwhile."""
    from cascowfs import fsck

    trash = str(sm.store / "trash") + "/"
    deadline = time.monotonic() + 5
    while True:
        with sm.quiesced():
            report = fsck.check(sm, deep=deep)
        # Since "discard detaches the overlay in the background", a discarded branch's mount
        # moves into trash/ with its directory and the background thread detaches it a moment
        # later: by design, so wait for that (briefly), and only for that.
        pending = [p for p in report.problems if p.startswith("invariant 4: mount at " + trash)]
        if not pending or len(pending) < len(report.problems) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert report.ok, "fsck found problems:\n  " + "\n  ".join(report.problems)


# ----------------------------------------------------------------------------------------
# comparable views of trees
# ----------------------------------------------------------------------------------------
class Node(NamedTuple):
    """Everything a reader sees of one path (docs/interface.md, Snapshots)."""

    kind: str  # f d l c b p s
    mode: int  # full st_mode
    uid: int
    gid: int
    mtime_ns: int
    data: bytes | None  # file content / symlink target / None
    rdev: int  # device nodes only, else 0
    xattrs: tuple[tuple[bytes, bytes], ...]  # sorted; trusted.overlay.* never included
    links: tuple[bytes, ...] | None  # every path of this inode inside the tree (if > 1)


_KIND = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
         stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def _xattrs_of(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    out = []
    for name in names:
        key = os.fsencode(name)
        if key.startswith(OVERLAY_PREFIX) or key.startswith(RESERVED_XATTR_PREFIX):
            continue  # overlayfs's own; cascowfs's own, which commit and import strip
        out.append((key, os.getxattr(path, name, follow_symlinks=False)))
    return tuple(sorted(out))


def _read_all(path: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        parts = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(parts)
            parts.append(b)
    finally:
        os.close(fd)


def dir_view(root: Path | str | bytes) -> dict[bytes, Node]:
    """The view of a real directory tree (lstat, readlink, listxattr, hard links by inode)."""
    base = os.fsencode(root)
    view: dict[bytes, Node] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}

    def node(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        kind = _KIND[stat.S_IFMT(st.st_mode)]
        data = None
        if kind == "f":
            data = _read_all(path)
        elif kind == "l":
            data = os.readlink(path)
        rdev = st.st_rdev if kind in "cb" else 0
        view[rel] = Node(kind, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, data, rdev,
                         _xattrs_of(path), None)
        if kind != "d":
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        else:
            for name in sorted(os.listdir(path)):
                node(path + b"/" + name, rel + b"/" + name if rel else name)

    node(base, b"")
    for members in inodes.values():
        if len(members) > 1:
            group = tuple(sorted(members))
            for p in members:
                view[p] = view[p]._replace(links=group)
    return view


def snapshot_view(sm, snapshot_id: str) -> dict[bytes, Node]:
    """The view of a snapshot, read from the CAS through the public read path. Also checks
    that sizes and the per-directory file/byte totals agree with what is stored."""
    root = sm.root_entry(snapshot_id)
    view: dict[bytes, Node] = {}
    groups: dict[bytes, list[bytes]] = {}

    def entry_node(e, rel: bytes) -> Node:
        kind = _KIND[stat.S_IFMT(e.mode)]
        data = None
        if kind == "f":
            data = sm.read_file(e.ref, 0, e.size + 1)
            assert len(data) == e.size, f"{rel!r}: entry size {e.size}, content {len(data)} bytes"
        elif kind == "l":
            data = e.ref
        if e.link and kind != "d":
            groups.setdefault(e.link, []).append(rel)
        return Node(kind, e.mode, e.uid, e.gid, e.mtime_ns, data, e.rdev if kind in "cb" else 0,
                    tuple(e.xattrs), None)

    def walk(e, rel: bytes) -> tuple[int, int]:
        files = total = 0
        for name, child in sorted(sm.read_tree(e.ref).items()):
            assert name == child.name and name and b"/" not in name, f"bad name {name!r} in {rel!r}"
            crel = rel + b"/" + name if rel else name
            view[crel] = entry_node(child, crel)
            if child.is_dir:
                f, t = walk(child, crel)
                assert (child.tree_files, child.tree_bytes) == (f, t), \
                    f"{crel!r}: stored totals {(child.tree_files, child.tree_bytes)}, counted {(f, t)}"
                files, total = files + f, total + t
            elif child.is_file:
                files, total = files + 1, total + child.size
        return files, total

    view[b""] = entry_node(root, b"")
    files, total = walk(root, b"")
    info = sm.snapshot(snapshot_id)
    assert (info.files, info.size) == (files, total) == (root.tree_files, root.tree_bytes), \
        f"snapshot {snapshot_id}: info {(info.files, info.size)}, root " \
        f"{(root.tree_files, root.tree_bytes)}, counted {(files, total)}"
    for members in groups.values():
        if len(members) > 1:  # a group of one (a member left alone by a copy-up) is no group
            group = tuple(sorted(members))
            for p in members:
                view[p] = view[p]._replace(links=group)
    return view


def _short(node: Node | None) -> str:
    if node is None:
        return "(absent)"
    data = node.data
    if data is not None and len(data) > 40:
        data = data[:40] + b"...(%d bytes)" % len(node.data)
    return repr(node._replace(data=data))


def describe_view_diff(got: dict[bytes, Node], want: dict[bytes, Node], limit: int = 12) -> str:
    paths = sorted(p for p in got.keys() | want.keys() if got.get(p) != want.get(p))
    lines = []
    for p in paths[:limit]:
        g, w = got.get(p), want.get(p)
        if g is not None and w is not None:
            fields = [f for f in Node._fields if getattr(g, f) != getattr(w, f)]
            lines.append(f"  {p!r}: differs in {fields}\n      got  {_short(g)}\n      want {_short(w)}")
        else:
            lines.append(f"  {p!r}:\n      got  {_short(g)}\n      want {_short(w)}")
    if len(paths) > limit:
        lines.append(f"  ... and {len(paths) - limit} more paths")
    return "\n".join(lines)


def assert_same_view(got: dict[bytes, Node], want: dict[bytes, Node], what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: views differ at {sum(1 for p in got.keys() | want.keys() if got.get(p) != want.get(p))} "
                             f"path(s):\n{describe_view_diff(got, want)}")


# ----------------------------------------------------------------------------------------
# status / diff oracle
# ----------------------------------------------------------------------------------------
def _text(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def expected_status(before: dict[bytes, Node] | None, after: dict[bytes, Node]
                    ) -> tuple[set[str], set[str]]:
    """(lines that must appear, lines that may appear) for the change ``before`` -> ``after``.

    Rules (docs/interface.md gives only the A|M|D line format; the engine documents the rest in
    trees.py, and these rules are what a reader can check independently):
    * a path only in ``after`` is ``A``, only in ``before`` is ``D``; a path that is a directory
      on one side and not on the other is ``D`` and ``A``;
    * a non-directory whose type, mode, owner, mtime, content/target, rdev or xattrs changed is
      ``M``; one whose only change is its hard-link grouping (another name was linked to it or
      unlinked from it) *may* be ``M``: its bytes and attributes are unchanged;
    * a directory whose mode, owner or xattrs changed is ``M``; one whose only change is its
      mtime *may* be ``M`` (every create/delete inside a directory moves its mtime, and the
      engine, like git, reports the children instead);
    * the root itself has no line (it has no path to print).
    """
    before = before or {}
    must: set[str] = set()
    may: set[str] = set()
    for p in (before.keys() | after.keys()) - {b""}:
        a, b = before.get(p), after.get(p)
        t = _text(p)
        if a is None:
            must.add(f"A {t}")
        elif b is None:
            must.add(f"D {t}")
        elif (a.kind == "d") != (b.kind == "d"):
            must.update({f"D {t}", f"A {t}"})
        elif a.kind == "d":
            if (a.mode, a.uid, a.gid, a.xattrs) != (b.mode, b.uid, b.gid, b.xattrs):
                must.add(f"M {t}")
            elif a.mtime_ns != b.mtime_ns:
                may.add(f"M {t}")
        elif a._replace(links=None) != b._replace(links=None):
            must.add(f"M {t}")
        elif a.links != b.links:
            may.add(f"M {t}")
    return must, may


def assert_status(changes, before: dict[bytes, Node] | None, after: dict[bytes, Node],
                  what: str) -> None:
    # the exact names, unquoted: quoting has its own tests (test_pathquote.py)
    lines = [f"{c.kind} {c.path}" for c in changes]
    assert len(lines) == len(set(lines)), f"{what}: duplicate lines {sorted(lines)}"
    assert changes == sorted(changes), f"{what}: not sorted: {lines}"
    must, may = expected_status(before, after)
    got = set(lines)
    missing, extra = must - got, got - must - may
    assert not missing and not extra, (f"{what}: status/diff lines wrong\n  missing: {sorted(missing)}"
                                       f"\n  unexpected: {sorted(extra)}")


# ----------------------------------------------------------------------------------------
# loop-mounted ext4
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def loop_ext4(workdir: Path, size_mib: int, options: str = "") -> Iterator[Path]:
    """A fresh ext4 (journaled, no reserved blocks) of ``size_mib`` on a loop device, mounted
    at ``workdir/disk`` (image ``workdir/disk.img``) with mount ``options``. Everything mounted
    below it is unmounted first on the way out."""
    workdir.mkdir(parents=True, exist_ok=True)
    img = workdir / "disk.img"
    try:
        make_ext4_image(img, size_mib)
        with mounted_image(img, workdir / "disk", options) as mnt:
            yield mnt
    finally:
        img.unlink(missing_ok=True)


def make_ext4_image(img: Path, size_mib: int) -> Path:
    """A sparse file of ``size_mib`` holding a fresh ext4 (journaled, no reserved blocks)."""
    with open(img, "wb") as fh:
        fh.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", str(img)],
                   check=True, capture_output=True)
    return img


@contextlib.contextmanager
def mounted_image(img: Path, mnt: Path, options: str = "") -> Iterator[Path]:
    """The ext4 image ``img`` on a loop device, mounted at ``mnt``; on the way out everything
    mounted below it is unmounted, then it, then the loop device is detached."""
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", *(["-o", options] if options else []), dev, str(mnt)],
                       check=True, capture_output=True)
        try:
            yield mnt
        finally:
            for m in sorted(mounts_below(mnt), key=lambda m: len(m.target), reverse=True):
                if m.target != str(mnt):
                    subprocess.run(["umount", "-l", m.target], capture_output=True)
            for attempt in range(50):
                if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


# ----------------------------------------------------------------------------------------
# child processes
# ----------------------------------------------------------------------------------------
def child_env(crash_at: str | None = None) -> dict[str, str]:
    """The environment for a child process: ours, armed at ``crash_at`` (or at nothing)."""
    from cascowfs.crashpoints import ENV_VAR

    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if crash_at:
        env[ENV_VAR] = crash_at
    return env


def run_child(code: str, *args: str, crash_at: str | None = None, timeout: float = 120
              ) -> subprocess.CompletedProcess:
    """Run ``python -c code args...`` (cwd: the repo), optionally armed to SIGKILL itself at a
    crash point; returns the finished process (never leaves it running)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                          env=child_env(crash_at), capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------
# leak check at the end of the session
# ----------------------------------------------------------------------------------------
_START_MOUNTS: set[int] = set()


def descendant_processes(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command) of every live (non-zombie) descendant of ``pid``."""
    parent_of: dict[int, int] = {}
    info: dict[int, tuple[str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        parent_of[int(entry)] = int(rest[1])
        info[int(entry)] = (rest[0], cmd)
    out = []
    for p, state_cmd in info.items():
        q = parent_of.get(p)
        while q is not None and q not in (0, 1, pid):
            q = parent_of.get(q)
        if q == pid and state_cmd[0] != "Z":
            out.append((p, *state_cmd))
    return out


def _other_pytest_running() -> bool:
    me = os.getpid()
    mine = {p for p, _, _ in descendant_processes(me)} | {me}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if b"pytest" in cmd:
            return True
    return False


def pytest_sessionstart(session) -> None:
    _START_MOUNTS.update(m.mount_id for m in all_mounts())


def pytest_sessionfinish(session, exitstatus) -> None:
    problems: list[str] = []
    warnings: list[str] = []
    basetemp = None
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and getattr(factory, "_basetemp", None) is not None:
        basetemp = str(factory.getbasetemp())

    # 1. mounts made by this run
    new = [m for m in all_mounts() if m.mount_id not in _START_MOUNTS
           and (m.fstype == "overlay" or m.fstype.startswith("fuse"))]
    stores = [str(s) for s in _STORES]
    ours = [m for m in new if (basetemp and m.target.startswith(basetemp + "/"))
            or any(m.target.startswith(s + "/") for s in stores)]
    # elsewhere: fusehelpers mounts under mkdtemp(); mounts outside the temp dir (a
    # benchmark's loop device under /var/tmp, say) are not a test run's doing
    tmp = tempfile.gettempdir().rstrip("/") + "/"
    others = [m for m in new if m not in ours and m.target.startswith(tmp)]
    if ours:
        problems.append("mounts left: " + ", ".join(f"{m.target} ({m.fstype})" for m in ours))
    if others:
        msg = "new mounts elsewhere: " + ", ".join(f"{m.target} ({m.fstype})" for m in others)
        # another pytest (a colleague's run on this VM) may own them: only then a warning
        (warnings if _other_pytest_running() else problems).append(msg)

    # 2. staging directories of stores opened through these helpers, or under the run's tmp
    candidates = set(_STORES)
    if basetemp and os.path.isdir(basetemp):
        for dirpath, dirnames, _ in os.walk(basetemp):
            if "staging" in dirnames and "wal" in dirnames:
                candidates.add(Path(dirpath))
            dirnames[:] = [d for d in dirnames if d not in ("layers", "branches", "trash", "meta")]
    for s in sorted(candidates):
        staging = s / "staging"
        if staging.is_dir():
            left = os.listdir(staging)
            if left:
                problems.append(f"staging directories left in {s}: {left}")

    # 3. child processes and StateManager threads
    kids = descendant_processes(os.getpid())
    if kids:
        problems.append("child processes left: " + "; ".join(f"{p} [{s}] {c[:120]}" for p, s, c in kids))
    threads = [t.name for t in threading.enumerate() if t.name.startswith("cascowfs")]
    if threads:
        problems.append(f"StateManager threads still running (a store was not closed): {threads}")

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for w in warnings:
        if reporter:
            reporter.write_line(f"LEAK CHECK WARNING: {w}", yellow=True)
    if problems:
        for p in problems:
            if reporter:
                reporter.write_line(f"LEAK: {p}", red=True, bold=True)
            else:
                print(f"LEAK: {p}", file=sys.stderr)
        for m in ours:
            subprocess.run(["umount", "-l", m.target], capture_output=True)
        if session.exitstatus in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
