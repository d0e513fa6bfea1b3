"""The threat model of docs/security.md, tried as an unprivileged local user would.

A store's own files are private to root, fresh or made by an older version; a user who is not
root reads nothing through the store directory, reads a snapshot only as the mount's
permission checks allow, changes nothing without the admin group, and, with it, imports only
what it may read itself. The user's side runs in a real process with that user's credentials
(``setpriv``) against a real daemon."""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascowfs import Client
from cascowfs import import_workers, privacy
from cascowfs.errors import PermissionDeniedError
from conftest import hypothesis_settings, open_store
from fusehelpers import Cascow, mounted, needs_fuse
from support.browser import monitor

NOBODY = 65534
PASSAGES = {"", "branches", "branches/*"}  # 0711: on the way to a branch's tree
# Copies of users' trees, with those trees' own modes, behind a private parent (a branch's
# upper and work directories sit in its private directory); a branch's tree is its mount.
USER_TREES = ("layers/*", "mounts/*", "staging/*", "trash/*", "branches/*/private/upper",
              "branches/*/private/work", "branches/*/tree")


def _pattern_of(rel: str) -> str:
    parts = rel.split("/") if rel else []
    if parts[:1] == ["branches"] and len(parts) >= 2:
        parts[1] = "*"
    if parts[:1] in (["layers"], ["mounts"], ["staging"], ["trash"]) and len(parts) >= 2:
        parts[1] = "*"
    return "/".join(parts)


def _inside_user_tree(rel: str) -> bool:
    pattern = _pattern_of(rel)
    return any(pattern == t or pattern.startswith(t + "/") for t in USER_TREES)


def store_modes(store: Path) -> dict[str, int]:
    """Mode of every path under ``store`` (relative; "" is the store), not entering mounts."""
    modes = {"": stat.S_IMODE(os.lstat(store).st_mode)}
    for dirpath, dirnames, filenames in os.walk(store):
        for name in list(dirnames):
            if os.path.ismount(os.path.join(dirpath, name)):
                dirnames.remove(name)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:  # the trash empties in the background
                continue
            modes[os.path.relpath(path, store)] = stat.S_IMODE(mode)
    return modes


def assert_private(store: Path) -> None:
    """Every path the store owns is root's alone (0700/0600) but the passages (0711); the
    users' trees it holds are reachable only through passages and their own modes."""
    modes = store_modes(store)
    for rel, mode in modes.items():
        if _inside_user_tree(rel):
            continue
        if _pattern_of(rel) in PASSAGES:
            assert mode == 0o711, (rel, oct(mode))
        else:
            assert mode & 0o077 == 0, (rel, oct(mode))
    # what others may reach from the store down and open: passages, and the trees of branches
    for rel in modes:
        parents = [""] + ["/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)]
        if rel and modes[rel] & 0o007 and all(modes[p] & 0o001 for p in parents):
            pattern = _pattern_of(rel)
            assert pattern in PASSAGES or pattern.startswith("branches/*/tree"), (
                rel, [oct(modes[p]) for p in parents])


SOURCE = {"dir/secret": ("root only", 0o600), "open": ("anyone", 0o644)}


def make_tree(top: Path, files: dict[str, tuple[str, int]]) -> Path:
    """Root's files (relative path: (text, mode)) in 0755 directories, under ``top``."""
    for rel, (text, mode) in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, mode)
        for d in path.relative_to(top).parents:  # "." (top) included
            os.chmod(top / d, 0o755)
    return top


def _populate(sm, base: Path) -> None:
    src = make_tree(base / "src", SOURCE)
    sm.import_tree(src, "s1")
    tree = sm.create_branch("b", "s1").tree
    (tree / "new").write_text("x")
    sm.commit("b", "s2")
    (tree / "pending").write_text("y")


def test_fresh_store_leaves_nothing_to_group_or_others(tmp_path, store):
    with open_store(store) as sm:
        _populate(sm, tmp_path)
        assert_private(store)
    assert_private(store)


def test_older_store_is_tightened_at_open(tmp_path, store, caplog):
    with open_store(store) as sm:
        _populate(sm, tmp_path)
    for rel in store_modes(store):  # as a version without privacy.py left it
        if not _inside_user_tree(rel):
            path = store / rel
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    os.chmod(store, 0o755)
    with caplog.at_level(logging.WARNING, logger="cascowfs.privacy"):
        with open_store(store) as sm:
            assert_private(store)
            assert sm.snapshot("s1") is not None and sm.branch("b") is not None
    lines = [r.getMessage() for r in caplog.records if r.name == "cascowfs.privacy"]
    assert len(lines) == 1 and "meta/data.mdb 644->600" in lines[0], lines
    with caplog.at_level(logging.WARNING, logger="cascowfs.privacy"):
        caplog.clear()
        with open_store(store):
            pass
    assert not [r for r in caplog.records if r.name == "cascowfs.privacy"]  # nothing left to do


@pytest.fixture
def shared_dir():
    """A directory every user may search, for files whose own modes are under test."""
    path = Path(tempfile.mkdtemp(prefix="cascowfs-reading-as-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_reading_as_checks_the_callers_access_on_this_thread_only(shared_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to take another user's credentials")
    group_file = shared_dir / "group"  # root's, readable by its group 4242 only
    group_file.write_text("for the group")
    os.chown(group_file, 0, 4242)
    os.chmod(group_file, 0o640)
    outside = {}
    entered, read = threading.Event(), threading.Event()

    def other_thread() -> None:
        entered.wait()
        outside["text"] = group_file.read_text()  # root's credentials, while the other reads
        read.set()

    groups_before = os.getgroups()
    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        with privacy.reading_as(privacy.Caller(NOBODY, NOBODY, ())):
            with pytest.raises(PermissionError):
                group_file.read_text()
            entered.set()
            assert read.wait(30)
        with privacy.reading_as(privacy.Caller(NOBODY, NOBODY, (4242,))):
            assert group_file.read_text() == "for the group"
            with pytest.raises(PermissionError):
                os.open(shared_dir / "new", os.O_CREAT | os.O_WRONLY, 0o600)  # not its dir
    finally:
        entered.set()
        thread.join()
    assert outside["text"] == "for the group"
    assert os.getgroups() == groups_before
    os.chmod(group_file, 0o000)  # root's capabilities are back: no mode keeps it out
    assert group_file.read_text() == "for the group"
    (shared_dir / "root's again").write_text("root may write here")


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_import_reads_its_source_as_the_reader_given(shared_dir, store, monkeypatch, workers):
    """An import given a reader opens every file with that reader's credentials, in the
    worker threads of a small import and the forked worker processes of a big one alike."""
    if os.geteuid() != 0:
        pytest.skip("needs root to take another user's credentials")
    if workers == "processes":
        monkeypatch.setattr(import_workers, "PROCESS_POOL_MIN_FILES", 4)
    src = make_tree(shared_dir / "src", {f"d/f{i:02}": (f"file {i}", 0o644) for i in range(40)})
    locked = src / "d" / "f33"
    os.chmod(locked, 0o600)  # root's alone: the reader may list it, not open it
    nobody = privacy.Caller(NOBODY, NOBODY)
    with open_store(store) as sm:
        with pytest.raises(PermissionDeniedError, match=f"{locked} is not readable by uid"):
            sm.import_tree(src, "refused", reader=nobody)
        assert "refused" not in [s.id for s in sm.snapshots()] and os.listdir(store / "staging") == []
        os.chmod(locked, 0o644)
        sm.import_tree(src, "read", reader=nobody)
        tree = sm.create_branch("b", "read").tree
        assert (tree / "d" / "f33").read_text() == "file 33"
        assert len(os.listdir(tree / "d")) == 40
        sm.discard("b")


def test_umask_is_the_stores_while_open_and_restored_after(store):
    before = os.umask(0o022)
    try:
        with open_store(store):
            assert os.umask(0o077) == 0o077
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


# ----------------------------------------------------------------------------------------
# as an unprivileged user, against a mounted store
# ----------------------------------------------------------------------------------------
USER_SCRIPT = r"""
import errno, json, os, sys
def outcome(op, path, arg=None):
    try:
        if op == "read":
            with open(path, "rb") as fh:
                fh.read(1)
        elif op == "list":
            os.listdir(path)
        elif op == "stat":
            os.lstat(path)
        elif op == "write":
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, arg.encode())
            finally:
                os.close(fd)
        elif op == "ctl":
            fd = os.open(path, os.O_RDWR)
            try:
                try:
                    os.write(fd, arg.encode())
                except OSError as exc:
                    return errno.errorcode[exc.errno] + " " + os.read(fd, 65536).decode().strip()
                return "ok " + os.read(fd, 65536).decode().strip()
            finally:
                os.close(fd)
        elif op == "mkdir":
            os.mkdir(path)
        elif op == "rmdir":
            os.rmdir(path)
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
print(json.dumps([outcome(*job) for job in json.loads(sys.argv[1])]))
"""


def as_user(jobs: list[tuple], *, groups: list[int] = ()) -> list[str]:
    """Run (op, path[, arg]) jobs as nobody (with ``groups`` only); each one's outcome."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    group_arg = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    # the system interpreter: the test's own may live where nobody may not read
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", *group_arg,
                           python, "-c", USER_SCRIPT, json.dumps([list(j) for j in jobs])],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def admin_group():
    """A group made for this module (and removed after): the daemon's --admin-group."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add a group and to switch users")
    name = f"cascowfs-t{os.getpid()}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        yield grp.getgrnam(name)
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def fs(admin_group):
    def populate(fs: Cascow) -> None:
        make_tree(fs.base / "src", SOURCE)

    with mounted("--admin-group", admin_group.gr_name, populate=populate) as fs:
        assert fs.ctl(f"import base {fs.base / 'src'}")[0] == 0
        code, reply = fs.ctl("branch work base")
        assert code == 0, reply
        tree = Path(reply.split(" ", 1)[1])
        (tree / "dir" / "secret").write_text("changed, still root only")  # now in the upper
        (tree / "open").write_text("changed, still anyone's")
        yield fs


@needs_fuse
def test_user_reads_nothing_through_the_store_directory(fs):
    modes = store_modes(fs.store)
    outside = [rel for rel in modes if not _inside_user_tree(rel) and rel]
    outside += [rel for rel in modes if _pattern_of(rel).startswith(
        ("layers/*", "mounts/*", "staging/*", "trash/*", "branches/*/private/"))]
    assert any(rel == "meta/data.mdb" for rel in outside)
    # a layer: its image file, or the files in its directory
    assert any(_pattern_of(rel).startswith("layers/*") for rel in outside)
    jobs = []
    for rel in outside:
        path = fs.store / rel
        jobs.append(("list" if path.is_dir() and not path.is_symlink() else "read", str(path)))
    jobs.append(("list", str(fs.store)))
    jobs.append(("list", str(fs.store / "branches")))
    results = as_user(jobs)
    for job, got in zip(jobs, results):
        assert got == "EACCES", (job, got)


@needs_fuse
def test_branch_upper_is_out_of_reach_by_its_full_path(fs):
    """The upper carries the tree root's mode (overlayfs shows it as the tree's root), and what
    the branch wrote keeps its own modes in it: its private parent keeps every user out of it,
    even one who knows each full path, while the same files stay readable through the tree."""
    private = fs.store / "branches" / "work" / "private"
    upper, tree = private / "upper", fs.store / "branches" / "work" / "tree"
    assert stat.S_IMODE(os.lstat(private).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(upper).st_mode) & 0o005 == 0o005  # the tree root's own mode
    rels = sorted(os.path.relpath(os.path.join(d, n), private)
                  for d, dirs, files in os.walk(private) for n in dirs + files)
    assert "upper/open" in rels and "upper/dir/secret" in rels
    assert as_user([("list", str(private))]) == ["EACCES"]
    for op in ("read", "list", "stat"):
        assert set(as_user([(op, str(private / r)) for r in rels])) == {"EACCES"}, op
    assert not os.path.lexists(tree.parent / "upper")  # nothing left where format 7 kept it
    assert as_user([("read", str(tree / "open")), ("read", str(tree / "dir" / "secret"))]) == [
        "ok", "EACCES"]  # the tree shows the same files under their own modes


@needs_fuse
def test_user_reads_a_snapshot_only_as_its_modes_allow(fs):
    snap = fs.mnt / "snapshots" / "base"
    assert as_user([("read", str(snap / "dir" / "secret")), ("read", str(snap / "open")),
                    ("list", str(snap / "dir"))]) == ["EACCES", "ok", "ok"]


@needs_fuse
def test_user_without_the_admin_group_changes_nothing(fs):
    before = (sorted(os.listdir(fs.mnt / "snapshots")), sorted(os.listdir(fs.mnt / "branches")))
    ctl = str(fs.mnt / "ctl")
    jobs = [("ctl", ctl, "branch evil base"), ("ctl", ctl, "commit work evil"),
            ("ctl", ctl, "discard work"), ("ctl", ctl, "prune base"),
            ("ctl", ctl, f"import evil {fs.base / 'src'}"),
            ("mkdir", str(fs.mnt / "branches" / "evil")),
            ("rmdir", str(fs.mnt / "branches" / "work")),
            ("rmdir", str(fs.mnt / "snapshots" / "base")),
            ("write", str(fs.mnt / "branches" / "work" / "commit"), "evil"),
            ("write", str(fs.mnt / "branches" / "work" / "parent"), "base")]
    for job, got in zip(jobs, as_user(jobs)):
        assert got.split()[0] == "EPERM", (job, got)
    assert (sorted(os.listdir(fs.mnt / "snapshots")), sorted(os.listdir(fs.mnt / "branches"))) \
        == before


@needs_fuse
def test_admin_imports_only_what_it_may_read(fs, admin_group):
    ctl = str(fs.mnt / "ctl")
    private = fs.base / "private"  # root's 0700 directory, as /root is
    private.mkdir()
    (private / "key").write_text("root's")
    os.chmod(private, 0o700)
    nested = make_tree(fs.base / "nested", {"a/b/key": ("root's", 0o600)})  # one file deep inside
    hidden = fs.base / "shut" / "inner"  # readable, behind a directory nobody may search
    hidden.mkdir(parents=True)
    os.chmod(fs.base / "shut", 0o700)
    os.chmod(hidden, 0o755)
    gid = admin_group.gr_gid
    got = as_user([("ctl", ctl, f"import p1 {private}"), ("ctl", ctl, f"import p2 {nested}"),
                   ("ctl", ctl, f"import p3 {hidden}"),
                   ("ctl", ctl, f"import p4 {fs.base / 'src' / 'dir'}"),
                   ("ctl", ctl, f"import ok {fs.base / 'src' / 'open'}")], groups=[gid])
    assert got[0].startswith("EACCES error EACCES") and str(private) in got[0], got[0]
    assert got[1].startswith("EACCES") and str(nested / "a" / "b" / "key") in got[1], got[1]
    assert got[2].startswith("EACCES") and str(hidden) in got[2], got[2]
    assert got[3].startswith("EACCES") and "secret" in got[3], got[3]
    assert got[4].split()[0] in ("ENOTDIR", "ENOENT"), got[4]  # a file: not importable at all
    snapshots = os.listdir(fs.mnt / "snapshots")
    assert not {"p1", "p2", "p3", "p4", "ok"} & set(snapshots)
    assert os.listdir(fs.store / "staging") == []
    # what the member may read imports; root imports the private directory as before
    readable = make_tree(fs.base / "readable", {"d/f": ("shared", 0o644)})
    os.symlink("/root", readable / "link")  # recorded as a link, never followed
    assert as_user([("ctl", ctl, f"import mine {readable}")], groups=[gid]) == ["ok ok mine"]
    assert (fs.mnt / "snapshots" / "mine" / "d" / "f").read_text() == "shared"
    assert os.readlink(fs.mnt / "snapshots" / "mine" / "link") == "/root"
    assert fs.ctl(f"import rootsown {private}")[0] == 0
    assert (fs.mnt / "snapshots" / "rootsown" / "key").read_text() == "root's"


# A tree node: (mode, uid, gid, children) for a directory, (mode, uid, gid, None) for a file.
_OWNERS = st.sampled_from([0, NOBODY])
_DIR_MODES = st.sampled_from([0o755, 0o750, 0o711, 0o705, 0o700, 0o500, 0o570, 0o057])
_FILE_MODES = st.sampled_from([0o644, 0o640, 0o604, 0o600, 0o400, 0o040, 0o004, 0o000])


def _trees(admin_gid: int) -> st.SearchStrategy:
    groups = st.sampled_from([0, NOBODY, admin_gid])
    files = st.tuples(_FILE_MODES, _OWNERS, groups, st.none())
    return st.recursive(
        files,
        lambda kids: st.tuples(_DIR_MODES, _OWNERS, groups,
                               st.dictionaries(st.sampled_from("abcd"), kids, max_size=3)),
        max_leaves=8).filter(lambda node: node[3] is not None)


def _may(node: tuple, want: int, groups: set[int]) -> bool:
    """Whether nobody, in ``groups``, has every bit of ``want`` (r=4, x=1) on ``node``."""
    mode, uid, gid, _ = node
    shift = 6 if uid == NOBODY else 3 if gid in groups else 0
    return (mode >> shift) & want == want


def _build(path: Path, node: tuple) -> None:
    mode, uid, gid, children = node
    if children is None:
        path.write_text(str(path))
    else:
        path.mkdir()
        for name, child in children.items():
            _build(path / name, child)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _first_refusals(path: Path, node: tuple, groups: set[int]) -> set[Path]:
    """The paths an import by nobody may be refused by: unreadable, below readable dirs."""
    children = node[3]
    if not _may(node, 4 if children is None else 5, groups):
        return {path}
    return set().union(*(_first_refusals(path / n, c, groups) for n, c in (children or {}).items()))


@needs_fuse
@hypothesis_settings(12)
@given(data=st.data())
def test_admin_import_is_refused_exactly_when_some_path_is_unreadable(fs, admin_group, data):
    tree = data.draw(_trees(admin_group.gr_gid))
    ident = f"prop{secrets.token_hex(4)}"
    top = fs.base / ident
    _build(top, tree)
    try:
        groups = {NOBODY, admin_group.gr_gid}
        refusals = _first_refusals(top, tree, groups)
        [got] = as_user([("ctl", str(fs.mnt / "ctl"), f"import {ident} {top}")],
                        groups=[admin_group.gr_gid])
        imported = (fs.mnt / "snapshots" / ident).exists()
        if refusals:
            assert got.startswith("EACCES error EACCES") and not imported, got
            named = got.split(f"import of {top}: ", 1)[1].rsplit(" is not readable", 1)[0]
            assert Path(named) in refusals, (named, refusals)
        else:
            assert got == f"ok ok {ident}" and imported, got
            assert fs.ctl(f"prune {ident}")[0] == 0
    finally:
        shutil.rmtree(top)


@needs_fuse
def test_an_observation_is_read_with_the_callers_rights(fs, admin_group):
    """``commit ... obs=@/path`` as an admin-group member: a file only root may read (or one
    behind a directory it may not search, or a symlink to one) is EACCES and commits nothing;
    a file it may read is stored, and shows with that file's owner and mode."""
    ctl, gid = str(fs.mnt / "ctl"), admin_group.gr_gid
    assert fs.ctl("branch obsb base")[0] == 0
    secret = make_tree(fs.base / "obs-secret", {"key": ("root's", 0o600)}) / "key"
    shut = make_tree(fs.base / "obs-shut", {"in/trace": ("open", 0o644)})
    os.chmod(shut / "in", 0o700)
    link = fs.base / "obs-link"
    os.symlink(secret, link)
    readable = make_tree(fs.base / "obs-open", {"trace": ("shared trace", 0o644)}) / "trace"
    got = as_user([("ctl", ctl, f"commit obsb o1 obs=@{secret}"),
                   ("ctl", ctl, f"commit obsb o2 obs=@{shut / 'in' / 'trace'}"),
                   ("ctl", ctl, f"commit obsb o3 obs=@{link}"),
                   ("ctl", ctl, f"commit obsb o4 obs=@{readable}")], groups=[gid])
    assert [g.split()[0] for g in got] == ["EACCES", "EACCES", "EACCES", "ok"], got
    assert str(secret) in got[0] or str(link) in got[2]
    snapshots = set(os.listdir(fs.mnt / "snapshots"))
    assert not {"o1", "o2", "o3"} & snapshots and "o4" in snapshots
    obs = fs.mnt / "observations" / "o4"
    assert obs.read_text() == "shared trace"
    assert stat.S_IMODE(os.stat(obs).st_mode) == 0o444 and os.stat(obs).st_uid == 0
    assert fs.ctl(f"commit obsb o5 obs=@{secret}")[0] == 0  # root reads it, as before
    assert as_user([("read", str(fs.mnt / "observations" / "o5"))]) == ["EACCES"]
    assert fs.ctl("discard obsb")[0] == 0


@needs_fuse
def test_root_follows_no_other_users_link_to_an_observation(fs):
    """Root's ``commit ... obs=@PATH`` reads what root may read: through a symbolic link an
    agent planted on the path (here as ``nobody``'s, in its own directory) it would store
    the target, a file only root may read, where the agent can read it. Such a link is
    EACCES naming it; root's own links are followed; a FIFO is refused before it is opened,
    so an agent's writer waiting on it stays waiting."""
    assert fs.ctl("branch obsr base")[0] == 0
    secret = make_tree(fs.base / "obsr-secret", {"key": ("root's only", 0o600)}) / "key"
    agents = fs.base / "obsr-agent"
    agents.mkdir()
    os.chown(agents, NOBODY, NOBODY)
    planted = agents / "output.txt"
    os.symlink(secret, planted)
    os.lchown(planted, NOBODY, NOBODY)
    hop = agents / "hop"  # a link of the agent's to a directory, midway
    os.symlink(secret.parent, hop)
    os.lchown(hop, NOBODY, NOBODY)
    own = fs.base / "obsr-root-link"
    os.symlink(secret, own)
    moved = agents / "result.txt"  # a link of root's the agent moved into its directory
    os.symlink(secret, moved)
    for path, why in ((planted, f"'output.txt', a symbolic link of uid {NOBODY}"),
                      (hop / "key", f"'hop', a symbolic link of uid {NOBODY}"),
                      (moved, "'result.txt', a symbolic link another user may move")):
        code, reply = fs.ctl(f"commit obsr r1 obs=@{path}")
        assert code == errno.EACCES and why in reply, reply
    assert "r1" not in os.listdir(fs.mnt / "snapshots")
    assert fs.ctl(f"commit obsr r2 obs=@{own}")[0] == 0
    assert (fs.mnt / "observations" / "r2").read_text() == "root's only"
    fifo = agents / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True)
    writer.start()
    try:
        code, reply = fs.ctl(f"commit obsr r3 obs=@{fifo}")
        writer.join(0.5)
        assert writer.is_alive(), "the daemon opened the FIFO"
        assert code == errno.EINVAL and "not a regular file" in reply, reply
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer go
        writer.join(5)
    assert fs.ctl("discard obsr")[0] == 0


def test_a_root_link_is_followed_only_where_no_other_user_may_move_it(tmp_path):
    """``privacy.resolve_trusting`` keeps, per directory walked into, whether another user
    may change the names on the way: ``..`` goes back to the parent's answer."""
    (tmp_path / "root" / "data").mkdir(parents=True)
    (tmp_path / "root" / "data" / "f").write_text("x")
    os.symlink("data", tmp_path / "root" / "link")
    agents = tmp_path / "agent"
    agents.mkdir()
    os.chown(agents, NOBODY, NOBODY)

    def resolves(path) -> bool:
        try:
            os.close(privacy.resolve_trusting(path, 0))
        except PermissionDeniedError:
            return False
        return True

    assert resolves(tmp_path / "root" / "link" / "f")
    assert resolves(f"{agents}/../root/link/f")  # out of the agent's directory: root's again
    os.symlink(tmp_path / "root" / "link", agents / "moved")  # root's, where the agent writes
    assert not resolves(agents / "moved" / "f")
    assert not resolves(f"{agents}/../agent/moved/f")
    os.chown(tmp_path / "root", NOBODY, NOBODY)  # the agent may now move root/link
    assert not resolves(tmp_path / "root" / "link" / "f")


def test_a_root_import_follows_no_other_users_link(tmp_path, monkeypatch):
    """Root imports what a path names; through a symbolic link an agent planted on it (in a
    directory the agent may write) it would import root's files as the agent's snapshot.
    Such a link is EACCES naming it, root's own are followed; and a directory on the way
    swapped for a link after the path was resolved is EBUSY, nothing imported."""
    from cascowfs import state
    from cascowfs.errors import BusyError

    secret = make_tree(tmp_path / "secret", {"src/key": ("root's only", 0o600)})
    os.chmod(secret, 0o700)
    agents = tmp_path / "agent"
    (agents / "run" / "src").mkdir(parents=True)
    (agents / "run" / "src" / "out").write_text("the agent's")
    os.chown(agents, NOBODY, NOBODY)
    planted = agents / "run2"
    os.symlink(secret, planted)
    os.lchown(planted, NOBODY, NOBODY)
    own = tmp_path / "root-link"
    os.symlink(agents / "run", own)
    moved = agents / "run3"  # a link of root's the agent moved into its directory
    os.symlink(secret, moved)
    with open_store(tmp_path / "store") as sm:
        with pytest.raises(PermissionDeniedError, match=r"'run2', a symbolic link of uid 65534"):
            sm.import_tree(planted, "stolen")
        with pytest.raises(PermissionDeniedError, match=r"'run3', a symbolic link another user"):
            sm.import_tree(moved, "stolen")
        assert sm.import_tree(own, "mine") == "mine"
        resolve = state.resolve_import_source

        def swapped_after(src, store, trusting=None):
            got = resolve(src, store, trusting)
            os.rename(agents / "run", agents / "was-run")  # as the agent may, in its directory
            os.symlink(secret, agents / "run")
            return got

        monkeypatch.setattr(state, "resolve_import_source", swapped_after)
        with pytest.raises(BusyError, match="replaced since the walk saw it"):
            sm.import_tree(agents / "run" / "src", "swapped")
        assert {s.id for s in sm.snapshots()} == {"mine"}


@needs_fuse
def test_anyone_may_query_and_only_admins_label_or_reset(fs):
    ctl = str(fs.mnt / "ctl")
    got = as_user([("ctl", ctl, "find --sort x"), ("ctl", ctl, "children"),
                   ("ctl", ctl, "label base k=v"), ("ctl", ctl, "reset work base"),
                   ("ctl", ctl, "find 'bad word'"), ("read", str(fs.mnt / "episodes"))])
    assert got[0].startswith("ok ok") and "base" in got[0].split()
    assert got[1].startswith("ok ok") and "base" in got[1].split()
    assert [g.split()[0] for g in got[2:5]] == ["EPERM", "EPERM", "EPERM"], got
    assert got[5] == "ok"
    with Client(fs.mnt) as c:
        assert "k" not in c.snapshot("base").labels


RACE_SCRIPT = r"""
import ctypes, json, os, sys, threading
ctl, src, prefix, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
stop = threading.Event()
def flip():  # swap the directory src/d and the symbolic link src/s, atomically, again and again
    d, s = os.fsencode(os.path.join(src, "d")), os.fsencode(os.path.join(src, "s"))
    while not stop.is_set():
        if libc.renameat2(-100, d, -100, s, 2) != 0:  # RENAME_EXCHANGE
            raise OSError(ctypes.get_errno(), "renameat2")
flipper = threading.Thread(target=flip)
flipper.start()
replies = []
try:
    for i in range(rounds):
        fd = os.open(ctl, os.O_RDWR)
        try:
            try:
                os.write(fd, f"import {prefix}{i} {src}".encode())
                replies.append("ok " + os.read(fd, 65536).decode().strip())
            except OSError as exc:
                replies.append(os.strerror(exc.errno) + " " + os.read(fd, 65536).decode().strip())
        finally:
            os.close(fd)
finally:
    stop.set()
    flipper.join()
print(json.dumps(replies))
"""


def _files_below(top: Path) -> list[Path]:
    return [Path(d) / n for d, _, files in os.walk(top) for n in files]


@needs_fuse
def test_admin_import_never_reads_what_a_swapped_in_link_reaches(fs, admin_group):
    """A member of the admin group imports a directory it owns while it swaps a directory in it
    for a symbolic link to a directory only root may search, as fast as it can: whatever the
    check before the import saw, the daemon reads the source as that member, so each import
    either holds the member's own files or is refused, and the root-only bytes never reach the
    store (not a snapshot, not a layer, not the metadata database)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    marker = f"root-only-{secrets.token_hex(16)}"
    race = fs.base / f"race-{secrets.token_hex(4)}"
    secret, src = race / "secret", race / "src"
    race.mkdir()
    os.chmod(race, 0o755)
    secret.mkdir(mode=0o700)
    src.mkdir()
    (src / "d").mkdir()
    for i in range(8):  # the same names on both sides: a path through the link finds a file
        (secret / f"f{i}").write_text(f"{marker} {i}\n")
        os.chmod(secret / f"f{i}", 0o644)  # only the directory above keeps others out
        (src / "d" / f"f{i}").write_text(f"the member's own {i}\n")
        os.chmod(src / "d" / f"f{i}", 0o644)
    os.symlink(secret, src / "s")
    for path in [src, src / "d", src / "s", *(src / "d").iterdir()]:
        os.lchown(path, NOBODY, NOBODY)
    os.chmod(src, 0o755)
    os.chmod(src / "d", 0o755)
    prefix = f"race{secrets.token_hex(3)}x"
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={admin_group.gr_gid}",
         python, "-c", RACE_SCRIPT, str(fs.mnt / "ctl"), str(src), prefix, "60"],
        capture_output=True, text=True, timeout=600, cwd="/")
    assert proc.returncode == 0, proc.stderr
    replies = json.loads(proc.stdout)
    assert len(replies) == 60
    imported = [r.split()[-1] for r in replies if r.startswith("ok ok ")]
    refused = [r for r in replies if not r.startswith("ok ok ")]
    for reply in refused:  # EBUSY: a link that turned into the directory as it was read
        assert reply.startswith(("Permission denied error EACCES ",
                                 "Device or resource busy error EBUSY ")), reply
        assert "EACCES" not in reply or f"is not readable by uid {NOBODY}" in reply, reply
    try:
        for ident in imported:
            snap = fs.mnt / "snapshots" / ident
            for path in _files_below(snap):
                assert marker not in path.read_text(errors="replace"), path
        assert os.listdir(fs.store / "staging") == []
        for path in _files_below(fs.store / "layers") + [fs.store / "meta" / "data.mdb"]:
            with open(path, "rb") as fh:
                assert marker.encode() not in fh.read(), path
    finally:
        for ident in imported:
            fs.ctl(f"prune {ident}")
        shutil.rmtree(race)


RESET_SCRIPT = r"""
import http.client, json, sys
url_host, port = sys.argv[1], int(sys.argv[2])
conn = http.client.HTTPConnection(url_host, port, timeout=60)
conn.request("POST", "/api/reset", body=sys.argv[3].encode(),
             headers={"Content-Type": "application/json"})
resp = conn.getresponse()
print(json.dumps([resp.status, json.loads(resp.read())]))
"""


@pytest.fixture
def admin_user(admin_group):
    """An account in the admin group (the monitor looks its groups up by uid), removed after."""
    name = f"cascowfs-a{os.getpid()}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups",
                    admin_group.gr_name, name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def reset_through_monitor_as(uid: int, gid: int, url: str, branch: str, ident: str
                             ) -> tuple[int, dict]:
    """POST a reset to the monitor at ``url`` from a process of ``uid``/``gid``."""
    where = urllib.parse.urlsplit(url)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           python, "-c", RESET_SCRIPT, where.hostname, str(where.port),
                           json.dumps({"branch": branch, "id": ident})],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    status, reply = json.loads(proc.stdout)
    return status, reply


@needs_fuse
def test_a_monitor_reset_is_the_local_users_own(fs, admin_user):
    """The monitor runs as root, yet a reset through it is sent with the credentials of the
    local user whose connection asked: EPERM for anyone outside the admin group (the branch
    keeps its changes), done for a member. The process asking has no groups of its own: the
    monitor takes the account's."""
    assert fs.ctl("branch steer base")[0] == 0
    tree = Path(os.readlink(fs.mnt / "branches" / "steer" / "tree"))
    (tree / "scratch").write_text("work in progress")
    status_file = fs.mnt / "branches" / "steer" / "status"
    try:
        with monitor(fs.mnt) as mon:
            status, reply = reset_through_monitor_as(NOBODY, NOBODY, mon.url, "steer", "base")
            assert status == 403 and reply["errno"] == "EPERM", reply
            assert "neither root nor in the mount's admin group" in reply["message"], reply
            assert status_file.read_text() == "A scratch\n"
            status, reply = reset_through_monitor_as(admin_user.pw_uid, admin_user.pw_gid,
                                                     mon.url, "steer", "base")
            assert status == 200 and reply["ok"], reply
            assert status_file.read_text() == ""
    finally:
        fs.ctl("discard steer")


FLIP_SCRIPT = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
d, s = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
print("flipping", flush=True)
while True:  # swap the directory d and the symbolic link s, atomically, until killed
    if libc.renameat2(-100, d, -100, s, 2) != 0:  # RENAME_EXCHANGE
        raise OSError(ctypes.get_errno(), "renameat2")
"""


@contextlib.contextmanager
def flipping_as_nobody(top: Path, secret: Path, marker: str) -> Iterator[None]:
    """``top/d`` (files f0..f7 of nobody's) and ``top/s``, a symbolic link to ``secret``, a
    directory only root may search holding files of the same names that carry ``marker``,
    swapped by a process of nobody's as fast as it can while the block runs."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    secret.mkdir(mode=0o700)
    (top / "d").mkdir()
    for i in range(8):  # the same names on both sides: a path through the link finds a file
        (secret / f"f{i}").write_text(f"{marker} {i}\n")
        os.chmod(secret / f"f{i}", 0o644)  # only the directory above keeps others out
        (top / "d" / f"f{i}").write_text(f"nobody's own {i}\n")
    os.symlink(secret, top / "s")
    for path in [top, top / "d", top / "s", *(top / "d").iterdir()]:
        os.lchown(path, NOBODY, NOBODY)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    flipper = subprocess.Popen(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-c",
         FLIP_SCRIPT, str(top / "d"), str(top / "s")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert flipper.stdout.readline() == "flipping\n", flipper.stderr.read()
        yield
        assert flipper.poll() is None, flipper.stderr.read()  # it flipped all along
    finally:
        flipper.kill()
        flipper.wait()
        flipper.stdout.close()
        flipper.stderr.close()


def through_the_race(fs: Cascow, command_of: Callable[[int], tuple[str, str]], made: list[str],
                     attempts: int, patience: float = 180.0) -> None:
    """``attempts`` (id, ctl command) pairs in turn while a swap races them, then more until
    one gets through (at most ``patience`` seconds on: a busy host can make a run of them all
    meet the swap): the ids made go into ``made``, every refusal must be the walk's EBUSY,
    and at least one must get through."""
    started = time.monotonic()
    tried = 0
    while tried < attempts or (not made and time.monotonic() - started < patience):
        ident, command = command_of(tried)
        tried += 1
        code, reply = fs.ctl(command)
        if code == 0:
            made.append(ident)
        else:
            assert reply.startswith("error EBUSY ") and "replaced since" in reply, reply
    assert made, f"nothing got through the race in {tried} attempts"


def assert_nowhere_in_store(fs: Cascow, idents: list[str], marker: str) -> None:
    for ident in idents:
        for path in _files_below(fs.mnt / "snapshots" / ident):
            assert marker not in path.read_text(errors="replace"), path
    for path in _files_below(fs.store / "layers") + [fs.store / "meta" / "data.mdb"]:
        with open(path, "rb") as fh:
            assert marker.encode() not in fh.read(), path


@needs_fuse
def test_commit_never_reads_through_a_link_swapped_in_by_the_branch(fs):
    """Code in a branch, as nobody, swaps a directory of its tree for a symbolic link to a
    directory only root may search, as fast as it can, while root commits the branch again
    and again: each commit holds the branch's own files or is EBUSY, and the root-only bytes
    never reach a snapshot, a layer or the metadata database."""
    marker = f"root-only-{secrets.token_hex(16)}"
    secret = fs.base / f"secret-{secrets.token_hex(4)}"
    assert fs.ctl("branch swapper base")[0] == 0
    tree = Path(os.readlink(fs.mnt / "branches" / "swapper" / "tree"))
    (tree / "work").mkdir()
    committed = []
    try:
        with flipping_as_nobody(tree / "work", secret, marker):
            through_the_race(fs, lambda i: (f"swap{i}", f"commit swapper swap{i}"), committed, 60)
        assert_nowhere_in_store(fs, committed, marker)
    finally:
        fs.ctl("discard swapper")
        for ident in committed:
            fs.ctl(f"prune {ident}")
        shutil.rmtree(secret)


@needs_fuse
def test_root_import_never_reads_through_a_link_swapped_in_by_the_owner(fs):
    """Root imports a directory that nobody owns and keeps swapping, as above: each import
    holds nobody's own files or is EBUSY, and the root-only bytes reach nothing."""
    marker = f"root-only-{secrets.token_hex(16)}"
    race = fs.base / f"race-{secrets.token_hex(4)}"
    race.mkdir()
    os.chmod(race, 0o755)
    (race / "src").mkdir()
    imported = []
    try:
        with flipping_as_nobody(race / "src", race / "secret", marker):
            through_the_race(
                fs, lambda i: (f"rootswap{i}", f"import rootswap{i} {race / 'src'}"), imported, 40)
        assert_nowhere_in_store(fs, imported, marker)
    finally:
        for ident in imported:
            fs.ctl(f"prune {ident}")
        shutil.rmtree(race)
